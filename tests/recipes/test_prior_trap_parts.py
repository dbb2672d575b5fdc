"""vzero.recipes.prior_trap* without Ray: the two-family data, the biased labels, the premise statistics on
hand-made answer tables, the plans and the choice of the best gate."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from vzero.data.synth import COLORS, QUESTION_TEMPLATES, synth_row
from vzero.recipes.prior_trap import BEST_K3, METHODS, method_overrides, pick_best, plan_for, run_overrides
from vzero.recipes.prior_trap_data import (
    CONTROL,
    TRAP,
    TRAP_QUESTION,
    answer_prior_stats,
    is_colour_index,
    write_biased_labels,
    write_colour_rows,
)
from vzero.recipes.prior_trap_premises import AnswerTable, delta_stats, family_scores, simulated_gate, view_stats


def test_colour_index_predicts_the_synth_family() -> None:
    for i in range(30):
        assert is_colour_index(i, 7) == (synth_row(i, 7, 64)["source"] == "color")


def test_two_families_alternate_and_biased_labels_touch_only_trap_rows(tmp_path) -> None:
    path = write_colour_rows(tmp_path / "rows.parquet", 40, seed=5, image_size=64)
    rows = pq.read_table(path).to_pylist()
    assert len(rows) == 40 and all(r["answer"] in COLORS for r in rows)
    assert [r["source"] for r in rows] == [CONTROL, TRAP] * 20
    assert {r["question"] for r in rows if r["source"] == TRAP} == {TRAP_QUESTION}
    assert {r["question"] for r in rows if r["source"] == CONTROL} == {QUESTION_TEMPLATES["color"]}
    out = write_biased_labels(path, tmp_path / "biased.parquet", answer="purple", rate=0.5, seed=3)
    biased = pq.read_table(out).to_pylist()
    changed = [(a, b) for a, b in zip(rows, biased, strict=True) if a["answer"] != b["answer"]]
    assert changed and all(a["source"] == TRAP and b["answer"] == "purple" for a, b in changed)
    assert all(a["image"] == b["image"] and a["id"] == b["id"] for a, b in zip(rows, biased, strict=True))
    again = write_biased_labels(path, tmp_path / "again.parquet", answer="purple", rate=0.5, seed=3)
    assert pq.read_table(again).column("answer").to_pylist() == [r["answer"] for r in biased], "deterministic"
    stats = answer_prior_stats(out, "purple")
    assert stats[TRAP]["share_answer"] > stats[CONTROL]["share_answer"]
    assert stats[TRAP]["rows"] == stats[CONTROL]["rows"] == 20


def _table(lp_first: list[list[float]], gold: list[int], sources: list[str]) -> AnswerTable:
    """Candidates a, b, c (P = c); every answer is one token + <|im_end|> with log-prob 0."""
    lp = torch.tensor(lp_first, dtype=torch.float32)
    token_lp = torch.stack([lp, torch.zeros_like(lp)], dim=-1)
    return AnswerTable(
        ids=[f"r{i}" for i in range(len(gold))], sources=sources, gold=gold, candidates=["a", "b", "c"],
        token_lp=token_lp, token_mask=torch.ones(3, 2, dtype=torch.bool),
    )  # fmt: skip


def test_view_and_delta_statistics_by_hand() -> None:
    ln = math.log
    # trap row 0 (answer a): crop p = (.6, .0, .4), neg p = (.1, .1, .8); row 1 answer c = P: excluded
    crop = _table([[ln(0.6), -20, ln(0.4)], [-20, -20, 0.0]], [0, 2], [TRAP, TRAP])
    neg = _table([[ln(0.1), ln(0.1), ln(0.8)], [-20, -20, 0.0]], [0, 2], [TRAP, TRAP])
    v = view_stats(crop, 2, TRAP)
    assert v["rows"] == 1 and v["p_trap"] == pytest.approx(0.4) and v["p_correct"] == pytest.approx(0.6)
    assert (v["argmax_accuracy"], v["argmax_trap_rate"]) == (1.0, 0.0)
    assert view_stats(neg, 2, TRAP)["argmax_trap_rate"] == 1.0
    d = delta_stats(crop, neg, 2, TRAP)
    assert d["trap"]["delta_mean"] == pytest.approx(ln(0.4 / 0.8), abs=1e-5)
    assert d["correct"]["delta_mean"] == pytest.approx(ln(6), abs=1e-5)
    assert d["other_wrong"]["delta_mean"] == pytest.approx(-20 - ln(0.1), abs=1e-4)
    # score S = mean over the 2 tokens of relu(Δ) − relu(−Δ) = Δ / 2 here
    assert d["trap"]["score_mean"] == pytest.approx(ln(0.5) / 2, abs=1e-5)
    assert d["trap"]["frac_delta_neg"] == 1.0 and d["correct"]["frac_delta_neg"] == 0.0


def test_simulated_gate_gives_p_samples_less_weight_than_correct_ones_when_the_negative_view_backs_p() -> None:
    ln = math.log
    crop = _table([[ln(0.6), -20, ln(0.4)]] * 4, [0] * 4, [TRAP] * 4)
    neg = _table([[ln(0.1), ln(0.1), ln(0.8)]] * 4, [0] * 4, [TRAP] * 4)
    student = _table([[ln(0.5), -30, ln(0.5)]] * 4, [0] * 4, [TRAP] * 4)  # only a and c are ever sampled
    g = simulated_gate(student, crop, neg, 2, n=8, alphas=(1.0,), groups_per_row=8)["1.0"]
    assert g["weight_correct"] > 1 > g["weight_trap"]
    assert g["share"]["other_wrong"] == 0.0


def test_family_scores_count_p_only_where_p_is_wrong() -> None:
    preds = [
        {"source": TRAP, "answer": "red", "prediction": "purple"},
        {"source": TRAP, "answer": "purple", "prediction": "purple"},
        {"source": TRAP, "answer": "blue", "prediction": "Blue."},
        {"source": CONTROL, "answer": "red", "prediction": "green"},
    ]
    s = family_scores(preds, "purple")
    assert s["by_family"] == {CONTROL: 0.0, TRAP: pytest.approx(2 / 3)}
    assert s["p_rate"] == {CONTROL: 0.0, TRAP: 0.5}
    assert s["accuracy"] == 0.5 and s["rows"] == 4


def test_plans_overrides_and_best_gate() -> None:
    full, smoke = plan_for("tiny"), plan_for("tiny", smoke=True)
    assert len(full.seeds) >= 5 and full.n_eval >= 1000 and set(full.methods) == {*METHODS, BEST_K3}
    assert smoke.steps < full.steps and smoke.methods[-1] == BEST_K3
    with pytest.raises(ValueError, match="unknown method"):
        plan_for("tiny", methods=("opd", "nope"))
    m = {"student": Path("s"), "teacher": Path("t")}
    ov = {k: set(run_overrides(full, k, 0, m, Path("d"), Path("o"))) - set(METHODS[k]) for k in METHODS}
    assert len({frozenset(v) for v in ov.values()}) == 1, "methods differ only in their gate / loss keys"
    assert method_overrides(BEST_K3, "seq-a2") == (*METHODS["seq-a2"], "loss.mode=k3")
    with pytest.raises(ValueError, match="best gated k1 method"):
        method_overrides(BEST_K3)

    def run(p: float, acc: float) -> dict:
        return {"curve": [{"p_rate": {TRAP: p}, "by_family": {TRAP: acc}}]}

    runs = {
        "seq-a1": {"0": run(0.3, 0.5), "1": run(0.3, 0.5)},
        "seq-a2": {"0": run(0.2, 0.4), "1": run(0.2, 0.4)},
        "token-a1": {"0": run(0.2, 0.6), "1": run(0.2, 0.6)},
        "opd": {"0": run(0.0, 0.9)},  # not a gated candidate
    }
    assert pick_best(runs) == "token-a1"
