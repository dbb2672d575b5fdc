"""vzero.eval: normalisation and scoring on hand-made numbers, then real greedy evaluations of the tiny model.

The end-to-end tests control what "correct" means without a trained model: a first evaluation records the tiny
model's own greedy answers, then a copy of the data gets answers set to those predictions on chosen rows (and to a
word the model did not say on the others), so the expected accuracy and per-source breakdown are known exactly.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from vzero.cli import main
from vzero.data.synth import write_synth
from vzero.eval.evaluate import (
    ANSWER_EMPTY,
    eval_image,
    evaluate,
    iter_labeled,
    normalize_answer,
    score,
)
from vzero.images import decode_rgb, encode_png
from vzero.records import Prompt
from vzero.views import positive_view

ENGINE = {"engine": "transformers", "min_pixels": 56 * 56, "max_pixels": 112 * 112, "max_tokens": 8}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Red", "red"),
        ("  red.", "red"),
        ("RED!!! and more", "red"),
        ("(7) apples", "7"),
        ("blue-green", "blue"),
        ("snake_case", "snake"),
        ("", ""),
        (" ?! ", ""),
        ("Ünïcode wörd", "ünïcode"),
    ],
)
def test_normalize_answer_lowercases_strips_punctuation_and_keeps_the_first_word(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_score_counts_exact_matches_overall_and_per_source() -> None:
    preds = ["Red.", "blue", "7", "circle", "triangle", "green"]
    golds = ["red", "Blue", "1", "circle", "square", "GREEN!"]
    sources = ["color", "color", "digit", "shape", "shape", None]
    res = score(preds, golds, sources)
    assert (res["correct"], res["evaluated"]) == (4, 6)
    assert res["accuracy"] == pytest.approx(4 / 6)
    assert res["by_source"] == {
        "color": {"accuracy": 1.0, "correct": 2, "evaluated": 2},
        "digit": {"accuracy": 0.0, "correct": 0, "evaluated": 1},
        "shape": {"accuracy": 0.5, "correct": 1, "evaluated": 2},
        "unknown": {"accuracy": 1.0, "correct": 1, "evaluated": 1},
    }
    assert score([], [], [])["accuracy"] == 0.0
    with pytest.raises(ValueError, match="lengths differ"):
        score(["a"], ["a", "b"], [None, None])


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("eval") / "raw.parquet"
    write_synth(path, n=12, seed=3, image_size=112)
    return pq.read_table(path).to_pylist()


def _write(path, rows: list[dict]):
    from vzero.data.schema import DatasetWriter

    with DatasetWriter(path) as w:
        w.write_all(rows)
    return path


def test_invalid_rows_are_counted_by_reason_and_never_evaluated(rows, tmp_path) -> None:
    bad = [dict(r) for r in rows[:5]]
    bad[0]["answer"] = None
    bad[1]["answer"] = "?!"
    bad[2]["evidence_box"] = [0.0, 0.0, 500.0, 10.0]
    bad[3]["id"] = bad[4]["id"]  # duplicate: the first occurrence (row 3) wins, row 4 is the duplicate
    path = _write(tmp_path / "bad.parquet", bad + [dict(r) for r in rows[5:8]])
    items = list(iter_labeled(path))
    assert [i if isinstance(i, str) else "ok" for i in items] == [
        "missing_field:answer",
        ANSWER_EMPTY,
        "box_outside_image:evidence_box",
        "ok",
        "duplicate_id",
        "ok",
        "ok",
        "ok",
    ]
    assert next(i for i in items if not isinstance(i, str)).answer == rows[3]["answer"]
    assert len(list(iter_labeled(path, limit=3))) == 3


def test_accuracy_and_breakdown_match_answers_set_from_the_models_own_greedy_outputs(
    tiny_model, rows, tmp_path
) -> None:
    """Rows 0, 2, 4, ... get the model's own prediction (re-cased, with punctuation) as answer: exactly those match."""
    raw = _write(tmp_path / "raw.parquet", rows)
    first = evaluate(tiny_model, raw, return_predictions=True, **ENGINE)
    preds = {p["id"]: normalize_answer(p["prediction"]) for p in first["predictions"]}
    assert sum(bool(p) for p in preds.values()) >= 6, "the random model should say some words"
    controlled, expected = [], {}
    for i, r in enumerate(rows):
        pred = preds[r["id"]]
        right = i % 2 == 0 and bool(pred)
        answer = f" {pred.upper()}!" if right else ("zzzz" if pred != "zzzz" else "qqqq")
        controlled.append({**r, "answer": answer})
        c, n = expected.get(r["source"], (0, 0))
        expected[r["source"]] = (c + right, n + 1)
    res = evaluate(tiny_model, _write(tmp_path / "controlled.parquet", controlled), **ENGINE)
    assert res["correct"] == sum(c for c, _ in expected.values())
    assert res["evaluated"] == res["rows"] == len(rows) and res["invalid"] == 0
    assert res["accuracy"] == pytest.approx(res["correct"] / len(rows))
    assert {s: (v["correct"], v["evaluated"]) for s, v in res["by_source"].items()} == expected
    assert res["engine"] == "transformers" and res["views"] == "full"
    assert (res["min_pixels"], res["max_pixels"]) == (56 * 56, 112 * 112)


def test_crop_view_is_the_teachers_positive_view(rows) -> None:
    r = rows[0]
    prompt = Prompt(uid=r["id"], image=r["image"], question=r["question"], evidence_box=tuple(r["evidence_box"]))
    full = decode_rgb(r["image"])
    assert eval_image(prompt, "full", margin=0.25, max_pixels=10**6).size == full.size
    crop = eval_image(prompt, "crop", margin=0.25, max_pixels=10**6)
    assert crop.tobytes() == positive_view(full, prompt.evidence_box, margin=0.25).tobytes()
    given = Prompt(**{**prompt.__dict__, "pos_images": (encode_png(full.crop((0, 0, 30, 20))),)})
    assert eval_image(given, "crop", margin=0.25, max_pixels=10**6).size == (30, 20)  # precomputed view wins
    with pytest.raises(ValueError, match="views must be"):
        eval_image(prompt, "side", margin=0.25, max_pixels=10**6)  # type: ignore[arg-type]


def test_cli_prints_one_json_line_writes_out_and_reports_unusable_files(tiny_model, rows, tmp_path, capsys) -> None:
    data = _write(tmp_path / "d.parquet", rows[:4])
    out = tmp_path / "res" / "eval.json"
    argv = ["eval", "--model", str(tiny_model), "--data", str(data), "--engine", "transformers", "--views", "crop"]
    assert main([*argv, "--limit", "3", "--max-pixels", "12544", "--max-tokens", "4", "--out", str(out)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1
    printed = json.loads(lines[0])
    assert printed == json.loads(out.read_text())
    assert (printed["rows"], printed["evaluated"], printed["views"], printed["max_pixels"]) == (3, 3, "crop", 12544)

    no_answer = tmp_path / "no_answer.parquet"
    pq.write_table(pq.read_table(data).drop(["answer"]), no_answer)
    assert main(["eval", "--model", str(tiny_model), "--data", str(no_answer)]) == 2
    assert "no 'answer' column" in capsys.readouterr().err
