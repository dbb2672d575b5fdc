"""`vzero recipe prior-trap --smoke` end to end on a real local Ray cluster, then `vzero regate` on its runs.

Invariants: the premises were measured and reported before the runs; every method got the same compute (steps,
trajectories per step); the gate was applied as its method says (opd: all 1; token-a1: per-token weights;
shuffled-a1: in every group exactly the multiset of weights `vzero regate` recomputes at α = 1 from the logged
log-probs, permuted; best-k3: loss.mode=k3 with the chosen gate); each curve starts at the shared init; every recorded
`vzero train` command parses back into the run's config and the recipe's own command is recorded; the report files
exist; `vzero regate` on a real run reproduces the applied weights' distribution and scores every sample against the
labels.
"""

from __future__ import annotations

import json
import shlex
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from vzero.cli import main
from vzero.config import load_config
from vzero.eval.regate import Setting, read_step, weights_for
from vzero.metrics_log import read_metrics
from vzero.recipes.prior_trap import SMOKE_METHODS
from vzero.recipes.prior_trap_premises import PREMISE_CHECKS

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_prior_trap_smoke_runs_every_path_with_equal_compute_and_regate_reproduces_the_weights(
    ray_local, tmp_path, capsys
) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["recipe", "prior-trap", "--smoke", "--out", str(out), "--work", str(work)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = json.loads((out / "results.json").read_text())
    assert res["command"] == shlex.join(["vzero", *argv])  # the recipe's own command, not its last run's
    assert list(res["runs"]) == list(SMOKE_METHODS) == list(summary["trap_p_rate"])
    assert set(res["premises"]["checks"]) == {k for k, _ in PREMISE_CHECKS}
    assert res["best_gate_for_k3"] == "token-a1"  # the only gated k1 candidate in the smoke
    plan = res["plan"]
    per_step = plan["prompts_per_step"] * plan["n"]
    base = res["premises"]["student_init_greedy"]
    for method, per_seed in res["runs"].items():
        run = per_seed["0"]
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]
        assert run["curve"][0]["p_rate"] == base["p_rate"]
        run_dir = Path(run["run_dir"])
        assert [m["trajectories"] for m in read_metrics(run_dir / "metrics.jsonl")] == [per_step] * plan["steps"]
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["loss"]["mode"] == ("k3" if method == "best-k3" else "k1_pg")
        diag = run["diagnostics"]
        assert diag["gradients"] and all(-1 <= g["cosine"] <= 1 for g in diag["gradients"])
        assert len(diag["per_step"]) == plan["steps"]
        for fam in diag["classes"].values():
            for c in fam.values():  # every class that was sampled has its weight, reward and advantage
                assert c["samples"] == 0 or None not in (c["applied"], c["reward"], c["advantage"])
        for path in sorted((run_dir / "trajectories").glob("step_*.parquet")):
            st = read_step(path)
            gate = weights_for(st, Setting(alpha=1.0))[1].tolist()
            if method == "opd":
                assert st.applied == [1.0] * per_step
            elif method in ("token-a1", "best-k3"):
                tw = pq.read_table(path, columns=["token_weights"]).column(0).to_pylist()
                assert [len(t) for t in tw] == [len(r) for r in st.response_ids]
            elif method == "shuffled-a1":
                groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
                for uid, a, g in zip(st.uids, st.applied, gate, strict=True):
                    groups[uid].append((a, g))
                for pairs in groups.values():
                    assert sorted(a for a, _ in pairs) == pytest.approx(sorted(g for _, g in pairs), abs=1e-6)
    for command in (r["command"] for per in res["runs"].values() for r in per.values()):
        argv = shlex.split(command)
        assert argv[:3] == ["vzero", "train", "--config"]
        cfg = load_config(REPO / argv[3], argv[4:])
        assert cfg.steps == plan["steps"] and cfg.rollout.n == plan["n"]
    md = (out / "results.md").read_text()
    assert "## Premises" in md and "## Paired differences against OPD" in md and "| shuffled-a1 |" in md
    for name in ("curves.png", "weights.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # `vzero regate` on a real run: the α = 1 row has the distribution of the weights the shuffled run applied (a
    # permutation of them); labels give an AUC.
    run_dir = Path(res["runs"]["shuffled-a1"]["0"]["run_dir"])
    train = work / "data" / "train.parquet"
    assert main(["regate", str(run_dir), "--alpha", "1", "--labels", str(train)]) == 0
    table = json.loads((run_dir / "regate.json").read_text())
    as_run, a1 = table["rows"]
    assert as_run["setting"] == "as run" and a1["setting"]["alpha"] == 1.0
    for key in ("weight_mean", "weight_std", "weight_min", "weight_max"):
        assert a1[key] == pytest.approx(as_run[key], abs=1e-6)
    assert table["labels"]["samples_scored"] == table["trajectories"] == per_step * plan["steps"]
    assert a1["auc"] is None or 0.0 <= a1["auc"] <= 1.0
    assert pq.read_table(train).num_rows == plan["n_train"]
