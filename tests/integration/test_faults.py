"""Nothing lost, nothing doubled: real faults against real runs, compared with an uninterrupted run of the same config.

Every faulted run trains on the 10,000-row file with 5 % bad rows (its stream meets some in steps 4-6) and must end
with exactly what the uninterrupted run left (bench/faults.py `differences`): one metrics record and one TensorBoard
value per step with the same losses, the same trajectory files, the same quarantined rows once each, the same
checkpoints and final weights (within 1e-6 on CPU).

- The driver (the real `vzero train` CLI in its own session) is SIGKILLed mid-rollout and mid-learner step, and
  resumed each time; a damaged newest checkpoint (truncated weights) is skipped with a warning naming it and written
  again. (Kills while a checkpoint is written or committed: the full matrix below.) The points are hit exactly
  with the pause hook of vzero/fault_points.py.
- A full disk (a tmpfs, root only) while a checkpoint is written stops the run with exit status 2 and a message
  naming the path and the free space, leaving the previous checkpoint intact; a learner process killed mid-step stops
  it with exit status 3 and a message that says to resume; `--resume` gets past both.
- Samplers and the gating actor killed with `ray.kill` at random moments (fixed seed) change nothing.
The full matrix (sync and async, 12 steps, a SIGKILL while committing over a damaged copy, more seeds and kills) is
`python -m bench.faults` (bench/results/faults-cpu.json).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.fault_harness import Cli, config, differences, fill, overrides, role_pid, run_with_actor_kills, tmpfs
from tests.conftest import REPO
from vzero import checkpoint as ckpt

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STEPS = 6
EXTRA = ("rollout.num_samplers=1",)  # one process fewer per start: each CLI start costs the most here


@pytest.fixture(scope="module")
def reference(ray_local, tiny_model, bad_rows_10k, tmp_path_factory) -> Path:
    """The uninterrupted run (in this process, on the session cluster)."""
    from vzero.driver import train

    cfg = config(tmp_path_factory.mktemp("reference") / "run", tiny_model, bad_rows_10k[0], steps=STEPS, extra=EXTRA)
    train(cfg)
    out = Path(cfg.output_dir)
    rows_met_late = {row for row, _ in _quarantined_after(out, step=4)}
    assert rows_met_late, "the stream must meet bad rows after checkpoint 4 for the quarantine checks to bite"
    return out


def _quarantined_after(out: Path, step: int) -> list[tuple[int, str]]:
    """Quarantined rows the checkpoint of `step` does not know (met later)."""
    import json

    import pyarrow.parquet as pq

    state = json.loads((out / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").read_text())
    known = {row for row, _ in state["stream"]["bad_rows"]}
    table = pq.read_table(out / "quarantine.parquet")
    return [
        (r, q)
        for r, q in zip(table["quarantine_row"].to_pylist(), table["quarantine_reason"].to_pylist(), strict=True)
        if r not in known
    ]


@pytest.mark.timeout(1200)  # several CLI starts (a Ray cluster each): minutes on a loaded 2-core box
def test_driver_sigkilled_mid_rollout_and_mid_step_and_resumed_ends_as_the_uninterrupted_run(
    reference, tiny_model, bad_rows_10k, tmp_path
) -> None:
    """Three CLI starts (each costs a Ray cluster): the SIGKILLs while a checkpoint is written or committed are in
    the full matrix (bench/faults.py, bench/results/faults-cpu.json: checkpoint@8, commit@6, checkpoint@12)."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    args = overrides(out, tiny_model, bad_rows_10k[0], steps=STEPS, extra=EXTRA)
    checkpoints = lambda: sorted(p.name for p in (out / "checkpoints").iterdir())  # noqa: E731

    cli = Cli(logs, args, pause="rollout@3")  # samplers generating step 3; checkpoint 2 written
    assert cli.wait_paused()["step"] == 3
    cli.kill()
    assert checkpoints() == ["step_000002"]

    cli = Cli(logs, args, resume=True, pause="learn@5")  # the learner training step 5; checkpoint 4 written
    cli.wait_paused()
    cli.kill()
    assert checkpoints() == ["step_000002", "step_000004"]

    damaged = out / "checkpoints" / "step_000004"
    weights = damaged / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # a copy cut short: the resume must not load it
    cli = Cli(logs, args, resume=True)  # back from 2: checkpoint 4 written again over the damaged copy, then on
    assert cli.wait() == 0, cli.output()[-4000:]
    assert f"checkpoint {damaged} is damaged and is skipped: model/model.safetensors is truncated" in cli.output()
    assert ckpt.problems(damaged) == [], "rewritten whole"
    assert differences(out, reference, steps=STEPS) == []


@pytest.mark.timeout(1200)  # several CLI starts (a Ray cluster each): minutes on a loaded 2-core box
def test_a_full_disk_and_a_dead_learner_stop_with_a_message_and_resume_gets_past_both(
    reference, tiny_model, bad_rows_10k, tmp_path
) -> None:
    try:
        disk_cm = tmpfs(tmp_path / "disk", size_mb=96)
        disk = disk_cm.__enter__()
    except PermissionError as exc:
        pytest.skip(f"a full disk needs a tmpfs: {exc}")
    try:
        out, logs = disk / "run", tmp_path / "logs"
        args = overrides(out, tiny_model, bad_rows_10k[0], steps=STEPS, extra=EXTRA)
        cli = Cli(logs, args, pause="logged@4")  # step 4 logged, its checkpoint next
        cli.wait_paused()
        filler = fill(disk, leave_bytes=256 * 1024)
        cli.release()
        assert cli.wait() == 2, cli.output()[-4000:]
        [error] = [ln for ln in cli.output().splitlines() if ln.startswith("error:")]
        assert "no space left on the device of" in error and str(out) in error and "MiB free" in error
        assert f"{out / 'checkpoints' / 'step_000002'} is intact" in error and "--resume" in error
        assert "Traceback" not in cli.output()
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"], "no partial one left"
        assert ckpt.problems(out / "checkpoints" / "step_000002") == []
        filler.unlink()  # space is back

        cli = Cli(logs, args, resume=True, pause="learn@6")
        cli.wait_paused()
        os.kill(role_pid(cli.proc.pid, "Learner"), signal.SIGKILL)  # the learner process dies mid-step
        cli.release()
        assert cli.wait() == 3, cli.output()[-4000:]
        [error] = [ln for ln in cli.output().splitlines() if ln.startswith("error:")]
        assert "the learner died" in error and "--resume" in error and "step_000004" in error

        cli = Cli(logs, args, resume=True)
        assert cli.wait() == 0, cli.output()[-4000:]
        assert differences(out, reference, steps=STEPS) == []
    finally:
        disk_cm.__exit__(None, None, None)


def test_samplers_and_gating_actors_killed_at_random_moments_change_nothing(
    ray_local, reference, tiny_model, bad_rows_10k, tmp_path
) -> None:
    cfg = config(tmp_path / "run", tiny_model, bad_rows_10k[0], steps=STEPS, extra=EXTRA)
    report = run_with_actor_kills(cfg, kills=4, seed=0)
    assert len(report["kills"]) == 4, report
    assert report["faults_counted"] >= 1, report
    assert differences(Path(cfg.output_dir), reference, steps=STEPS) == []


def test_half_written_checkpoint_is_never_picked_up(tmp_path) -> None:
    root = tmp_path / "checkpoints"
    done = ckpt.begin(root, 2)
    (done / "trainer_state.json").write_text("{}")
    ckpt.commit(done, keep_last=2)
    crashed = ckpt.begin(root, 3)  # a writer that died before commit: no COMPLETE marker, still .tmp-*
    (crashed / "trainer_state.json").write_text("{}")
    unmarked = root / "step_000004"  # a directory someone copied by hand without the marker
    unmarked.mkdir()
    assert ckpt.latest_checkpoint(root) == root / "step_000002"
    newer = ckpt.begin(root, 5)
    ckpt.commit(newer, keep_last=2)
    assert ckpt.latest_checkpoint(root) == root / "step_000005"


def test_bad_config_fails_before_any_actor_starts(tmp_path) -> None:
    """A bad value is reported with its field path and exit code 2, in seconds, with no Ray cluster started."""
    t0 = time.time()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "vzero.cli",
            "train",
            "--config",
            "configs/tiny-cpu.yaml",
            "rollout.n=0",
            "gate.levle=token",
            f"output_dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "rollout.n: Input should be greater than or equal to 1 (got 0)" in res.stderr
    assert "gate.levle: unknown key (did you mean 'gate.level'?)" in res.stderr
    assert "Started a local Ray instance" not in res.stderr + res.stdout
    assert time.time() - t0 < 60
