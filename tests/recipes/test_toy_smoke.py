"""`vzero recipe toy --smoke` end to end on a real local Ray cluster: the whole pipeline (synth data -> crop-SFT
teacher -> opd / vzero-seq / vzero-token through the real driver -> checkpoint evaluation -> report) in ~1 minute.

Invariants: every method got the same compute (steps, trajectories per step); the gate was applied exactly as its
method says (opd: all weights 1; sequence: one weight per trajectory, not all 1; token: per-token weights); each
curve starts at the shared base accuracy; every recorded `vzero train` command line parses back into the config the
run used; the report files exist and the markdown states the verdict.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from vzero.cli import main
from vzero.config import load_config
from vzero.metrics_log import read_metrics
from vzero.recipes.toy import METHODS

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_toy_smoke_runs_every_method_with_equal_compute_and_writes_the_report(ray_local, tmp_path, capsys) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    assert main(["recipe", "toy", "--smoke", "--out", str(out), "--work", str(work)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == set(METHODS) == set(summary["accuracy"])
    plan = results["plan"]
    assert plan["seeds"] == [0] and plan["steps"] == 2

    traj_per_step = plan["prompts_per_step"] * plan["n"]
    for method, per_seed in results["runs"].items():
        run = per_seed["0"]
        assert [p["step"] for p in run["curve"]] == [0, 2]
        assert run["curve"][0]["accuracy"] == results["base"]["accuracy"]
        assert 0.0 <= run["final"] <= 1.0 and run["wall_seconds"] > 0
        run_dir = work / "runs" / f"{method}-seed0"
        metrics = read_metrics(run_dir / "metrics.jsonl")
        assert [m["trajectories"] for m in metrics] == [traj_per_step] * plan["steps"]
        table = pq.read_table(run_dir / "trajectories" / "step_000001.parquet").to_pylist()
        weights = [r["weight"] for r in table]
        if method == "opd":
            assert weights == [1.0] * traj_per_step
        elif method == "vzero-seq":
            assert all(r["token_weights"] is None for r in table) and weights != [1.0] * traj_per_step
        else:
            assert all(len(r["token_weights"]) == len(r["response_ids"]) for r in table)
        used = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert used["gate"]["enabled"] == (method != "opd")

    assert len(results["train_commands"]) == len(METHODS)
    for command in results["train_commands"]:
        argv = shlex.split(command)
        assert argv[:3] == ["vzero", "train", "--config"]
        cfg = load_config(REPO / argv[3], argv[4:])  # the path is written relative to the repository root
        assert cfg.steps == plan["steps"] and cfg.rollout.n == plan["n"]

    md = (out / "results.md").read_text()
    assert "## Verdict" in md and "one seed only: no conclusion possible" in md
    assert all(f"| {m} |" in md for m in METHODS)
    assert (out / "accuracy_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(results["teacher"]["crop_accuracy"]["model"]).name == "teacher"
