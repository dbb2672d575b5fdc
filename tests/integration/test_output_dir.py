"""Starting a run in an output_dir: refused when another run lives there, cleared on --overwrite, a finished run's
--resume starts nothing, a teacher whose tokenizer differs from the student's is refused before any actor starts,
and with the gate off the metrics name what the gate would have said apart from the weights applied.

The refusals run the `vzero` CLI as a user would (exit status 2, one line naming the way out, no Ray cluster
started); one short in-process run on the session cluster (gate off, --overwrite of an old run) provides the
finished run the other tests look at.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from gating.gate import DIAGNOSTIC_KEYS, WEIGHT_KEYS, evidence_weights
from tests.conftest import REPO, tiny_config
from vzero.config import ConfigError
from vzero.metrics_log import read_metrics

pytestmark = pytest.mark.ray
VZERO = str(Path(sys.executable).with_name("vzero"))
RAY_STARTED = "Started a local Ray instance"


def _old_run(out: Path) -> None:
    """What a finished 4-step run leaves behind (enough for the checks: metrics, a checkpoint, trajectories)."""
    (out / "checkpoints" / "step_000004").mkdir(parents=True)
    (out / "checkpoints" / "step_000004" / "COMPLETE").write_text("ok\n")
    (out / "trajectories").mkdir()
    (out / "trajectories" / "step_000004.parquet").write_bytes(b"old")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))


def _cli(tiny_model, synth_data, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        VZERO,
        "train",
        "--config",
        str(REPO / "configs/tiny-cpu.yaml"),
        *args,
        "steps=2",
        f"output_dir={out}",
        f"data.path={synth_data}",
        "data.synth=null",
        f"student.path={tiny_model}",
        "student.build=null",
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_fresh_run_into_an_output_dir_holding_a_run_is_refused(tiny_model, synth_data, tmp_path) -> None:
    out = tmp_path / "used"
    _old_run(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    res = _cli(tiny_model, synth_data, out)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert line and "already holds a run" in line[0] and "--resume" in line[0] and "fresh output_dir" in line[0]
    assert "--overwrite" in line[0]
    assert RAY_STARTED not in res.stdout + res.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "nothing of the old run touched"


@pytest.fixture(scope="module")
def finished_run(ray_local, tiny_model, synth_data, tmp_path_factory):
    """A 2-step run with the gate off and two gating actors, started with overwrite=True over an old run."""
    from vzero.driver import train

    cfg = tiny_config(
        tmp_path_factory.mktemp("overwrite"),
        tiny_model,
        synth_data,
        "steps=2",
        "gate.enabled=false",
        "teacher.num_actors=2",
        "rollout.num_samplers=1",
        "rollout.engine=transformers",
        "teacher.engine=transformers",
    )
    out = Path(cfg.output_dir)
    _old_run(out)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg)
    train(cfg, overwrite=True)
    return cfg, out


@pytest.mark.slow
def test_overwrite_clears_the_old_runs_outputs(finished_run) -> None:
    _, out = finished_run
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"]
    assert sorted(p.name for p in (out / "trajectories").iterdir()) == ["step_000001.parquet", "step_000002.parquet"]


@pytest.mark.slow
def test_gate_off_logs_the_applied_weights_and_what_the_gate_would_have_said(finished_run) -> None:
    cfg, out = finished_run
    for m in read_metrics(out / "metrics.jsonl"):
        rows = pq.read_table(out / "trajectories" / f"step_{m['step']:06d}.parquet").to_pylist()
        assert {r["weight"] for r in rows} == {1.0}, "plain on-policy distillation: every weight applied is 1"
        assert (m["gate/weight_mean"], m["gate/weight_min"], m["gate/weight_max"]) == (1.0, 1.0, 1.0)
        assert {k for k in m if k.startswith("gate/")} == {f"gate/{k}" for k in WEIGHT_KEYS}
        T = max(len(r["lp_pos"]) for r in rows)
        pos, neg, mask = torch.zeros(len(rows), T), torch.zeros(len(rows), T), torch.zeros(len(rows), T)
        for i, r in enumerate(rows):
            k = len(r["lp_pos"])
            pos[i, :k], neg[i, :k], mask[i, :k] = torch.tensor(r["lp_pos"]), torch.tensor(r["lp_neg"]), 1.0
        g = cfg.gate
        _, would = evidence_weights(
            pos, neg, mask, [r["uid"] for r in rows], gamma=g.gamma, alpha=g.alpha, w_min=g.w_min, w_max=g.w_max
        )
        for key in DIAGNOSTIC_KEYS:  # over both gating actors' trajectories together
            assert m[f"gate_would/{key}"] == pytest.approx(would[key], abs=1e-6), key


@pytest.mark.slow
def test_resume_of_a_finished_run_says_so_without_starting_a_cluster(finished_run, tiny_model, synth_data) -> None:
    _, out = finished_run
    metrics = (out / "metrics.jsonl").read_text()
    res = _cli(tiny_model, synth_data, out, "--resume")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "already finished" in res.stdout and "step_000002" in res.stdout
    assert RAY_STARTED not in res.stdout + res.stderr
    assert (out / "metrics.jsonl").read_text() == metrics


def test_a_teacher_with_another_tokenizer_is_refused_before_any_actor_starts(tiny_model, synth_data, tmp_path) -> None:
    from vzero.models.tokenizer import build_tokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model, teacher)
    build_tokenizer(400).save_pretrained(str(teacher))
    res = _cli(tiny_model, synth_data, tmp_path / "run", f"teacher.model={{path: {teacher}}}")
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert line and "teacher.model.path" in line[0] and "token ids differ" in line[0]
    assert RAY_STARTED not in res.stdout + res.stderr
