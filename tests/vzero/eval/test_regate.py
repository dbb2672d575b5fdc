"""vzero.eval.regate / `vzero regate`: weights recomputed from logged log-probs on a hand-made run directory.

The run directory holds one step with two groups: group "a" has a grounded trajectory (answer token Δ = +2) that says
the right colour and an ungrounded one (Δ = −2) that says a wrong one; group "b" is a lone trajectory without a label.
Every second token is <|im_end|> with Δ = 0. So, by hand (γ = 1): S = +1 / −1 in group a, A = ±1, and at α = 0.5 the
weights are 1.5 / 0.5 (b: 1), at α = 2 they clamp to 2 / 0. The real-run check (recomputed == applied weights) is in
tests/recipes/test_prior_trap_smoke.py.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from vzero.cli import main
from vzero.eval.regate import Setting, auc, make_grid, regate, render_markdown
from vzero.models.loading import load_processor
from vzero.trajectory_log import SCHEMA


def _run_dir(root: Path, tokenizer_dir: Path, *, drop: str | None = None) -> Path:
    tok = load_processor(tokenizer_dir).tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    red, blue = tok.encode("red", add_special_tokens=False), tok.encode("blue", add_special_tokens=False)
    assert len(red) == len(blue) == 1
    rows = [  # uid, response, lp_pos, lp_neg, applied weight
        ("a", [*red, end], [-0.1, -0.01], [-2.1, -0.01], 1.0),
        ("a", [*blue, end], [-3.0, -0.02], [-1.0, -0.02], 1.0),
        ("b", [*blue, end], [-1.0, -0.05], [-1.5, -0.05], 1.0),
    ]
    cols = {name: [] for name in SCHEMA.names}
    for i, (uid, resp, lp_pos, lp_neg, w) in enumerate(rows):
        row = {
            "step": 0, "uid": uid, "sample_index": i, "policy_version": 0, "prompt_ids": [1], "response_ids": resp,
            "lp_old": [-1.0, -1.0], "lp_pos": lp_pos, "lp_neg": lp_neg, "weight": w, "token_weights": None,
            "finish_reason": "stop", "negative_mode": "precomputed",
        }  # fmt: skip
        for k, v in row.items():
            cols[k].append(v)
    table = pa.table(cols, schema=SCHEMA)
    if drop:
        table = table.drop_columns([drop])
    run = root / "run"
    (run / "trajectories").mkdir(parents=True)
    pq.write_table(table, run / "trajectories" / "step_000000.parquet")
    gate = {"enabled": False, "level": "sequence", "alpha": 0.5, "gamma": 1.0, "w_min": 0.0, "w_max": 2.0}
    (run / "config.yaml").write_text(yaml.safe_dump({"student": {"path": str(tokenizer_dir)}, "gate": gate}))
    return run


def _labels(path: Path, ids: list[str | None], answers: list[str | None]) -> Path:
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "answer": pa.array(answers, pa.string())}), path)
    return path


def test_auc_counts_pairs_and_ties_half() -> None:
    assert auc([3, 2, 1], [True, True, False]) == 1.0
    assert auc([1, 2, 3], [True, True, False]) == 0.0
    assert auc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    assert auc([2, 1, 2, 0], [True, True, False, False]) == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert auc([1, 2], [True, True]) is None


def test_sequence_weights_and_separation_match_the_hand_computation(tiny_model, tmp_path) -> None:
    run = _run_dir(tmp_path, tiny_model)
    labels = _labels(tmp_path / "labels.parquet", ["a", "x", None], ["Red.", "green", "blue"])
    grid = make_grid([0.0, 0.5, 2.0], [1.0], [0.0], [2.0], ["sequence"])
    res = regate(run, grid, labels=labels)
    assert (res["steps"], res["trajectories"], res["tokens"]) == (1, 3, 6)
    assert res["delta_mean"] == pytest.approx((2 + 0 - 2 + 0 + 0.5 + 0) / 6, abs=1e-6)
    assert res["frac_delta_pos"] == pytest.approx(2 / 6)
    lab = res["labels"]
    assert (lab["samples_scored"], lab["samples_unlabelled"], lab["sample_accuracy"]) == (2, 1, 0.5)
    assert lab["label_invalid"] == {"missing_field:id": 1}
    as_run, a0, a05, a2 = res["rows"]
    assert as_run["setting"] == "as run" and as_run["auc"] == 0.5 and as_run["weight_std"] == 0.0
    assert a0["weight_mean"] == pytest.approx(1.0) and a0["auc"] == 0.5
    assert (a05["weight_correct"], a05["weight_wrong"]) == pytest.approx((1.5, 0.5), abs=1e-5)
    assert a05["weight_min"] == pytest.approx(0.5, abs=1e-5) and a05["weight_max"] == pytest.approx(1.5, abs=1e-5)
    assert a05["auc"] == 1.0 and a05["frac_at_w_min"] == 0.0
    assert (a2["weight_correct"], a2["weight_wrong"]) == (2.0, 0.0)
    assert a2["frac_at_w_min"] == pytest.approx(1 / 3) and a2["frac_at_w_max"] == pytest.approx(1 / 3)
    assert a2["weight_std"] == pytest.approx((2 / 3) ** 0.5)
    md = render_markdown(res)
    assert "| sequence α=0.5 γ=1 [0, 2] | 1.000 |" in md and "AUC" in md


def test_token_level_pools_the_groups_tokens(tiny_model, tmp_path) -> None:
    run = _run_dir(tmp_path, tiny_model)
    res = regate(run, [Setting(alpha=0.5, level="token")])
    row = res["rows"][1]
    # group a's token scores [2, 0, -2, 0]: mean 0, std sqrt(2); group b's [0.5, 0]: mean 0.25, std 0.25
    a = 0.5 * 2 / 2**0.5
    expected = [1 + a, 1.0, 1 - a, 1.0, 1.5, 0.5]
    assert row["weight_min"] == pytest.approx(min(expected), abs=1e-5)
    assert row["weight_max"] == pytest.approx(max(expected), abs=1e-5)
    assert row["weight_mean"] == pytest.approx(1.0, abs=1e-5)


def test_cli_writes_json_and_markdown_with_the_runs_defaults(tiny_model, tmp_path, capsys) -> None:
    run = _run_dir(tmp_path, tiny_model)
    out = tmp_path / "table" / "regate.json"
    assert main(["regate", str(run), "--alpha", "0.5", "2", "--level", "sequence", "token", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and out.with_suffix(".md").read_text() == printed
    assert printed.count("| sequence α=") == 2 and printed.count("| token α=") == 2
    assert main(["regate", str(run)]) == 0  # default grid: α 0.5 1 2 at the run's γ/bounds/level
    assert (run / "regate.json").is_file() and capsys.readouterr().out.count("| sequence α=") == 3


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_dir", "no such run directory"),
        ("no_trajectories", "no trajectories"),
        ("missing_column", "column(s) ['lp_neg'] missing"),
        ("labels_without_id", "labels need columns ['id']"),
        ("labels_not_parquet", "cannot read as Parquet"),
        ("bad_grid", "w_min (3.0) must be <= w_max (2.0)"),
    ],
)
def test_unusable_input_exits_2_with_one_line(tiny_model, tmp_path, capsys, case, message) -> None:
    args = {
        "no_dir": lambda: [str(tmp_path / "nope")],
        "no_trajectories": lambda: [str((tmp_path / "empty").mkdir() or tmp_path / "empty")],
        "missing_column": lambda: [str(_run_dir(tmp_path, tiny_model, drop="lp_neg"))],
        "labels_without_id": lambda: [
            str(_run_dir(tmp_path, tiny_model)),
            "--labels",
            str(pq.write_table(pa.table({"answer": ["red"]}), tmp_path / "l.parquet") or tmp_path / "l.parquet"),
        ],
        "labels_not_parquet": lambda: [
            str(_run_dir(tmp_path, tiny_model)),
            "--labels",
            str((tmp_path / "l.txt").write_text("id,answer") and tmp_path / "l.txt"),
        ],
        "bad_grid": lambda: [str(_run_dir(tmp_path, tiny_model)), "--w-min", "3"],
    }[case]()
    assert main(["regate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vzero regate: ") and message in err and "\n" not in err
