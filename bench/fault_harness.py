"""The machinery of the fault runs (bench/faults.py, tests/integration/test_faults.py): real processes, real signals,
a real full disk, and the comparison of a faulted run's output_dir with an uninterrupted run's.

- `Cli`: the real `vzero train` in its own session, optionally held at a point (vzero/fault_points.py), then
  SIGKILLed (`kill`: the driver first, then what is left of its session: Ray's agents outlive a killed driver), or
  released after the test changed the world (a full disk, a learner process killed by its Ray process title).
- `differences(out, ref)`: every way the output_dir of a faulted run differs from the reference run's: metrics
  records (one per step, the same losses), TensorBoard (one value per tag and step, for EventAccumulator and for a
  plain reader of every events file), trajectory files (the same rows), the quarantine file (the same rows, once),
  the checkpoints (no partial or stale directory, the same step, weights within `atol`). Empty = nothing lost,
  nothing doubled.
- `run_with_actor_kills`: the driver in this process while a thread `ray.kill`s samplers and gating actors at random
  moments drawn from a seed.
- `tmpfs` / `fill`: a small filesystem (root only) and a filler file that leaves a given number of bytes free.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
TIMEOUT_S = 900.0
RAY_START_TIMEOUT = "The current node timed out during startup"  # Ray's own message (ray/_private/node.py)
# The stream's seed for the fault runs: with it, the 10,000-row file of bad_rows.py (seed 0) has bad rows in the
# prompts of steps 4-9, so kills after a checkpoint land on quarantined rows the checkpoint does not know yet.
RUN_SEED = 20
# Columns of a trajectory file that a fault must not change (timings and fault counts live in metrics only).
TRAJECTORY_COLUMNS = ("step", "uid", "sample_index", "policy_version", "response_ids", "lp_old", "lp_pos", "lp_neg")
# metrics that must be equal to the reference's, step by step
SAME_METRICS = ("loss", "policy_version", "gate/weight_mean", "learner/grad_norm", "staleness", "data/quarantined")


# -- the real CLI, held and killed ---------------------------------------------------------------------------------
class Cli:
    """`vzero train` in a new session (its pid is the session id); stdout+stderr go to `logs/<name>.log` and the pause
    file lives in `logs` too (never on a disk a test fills)."""

    def __init__(self, logs: Path, overrides: list[str], *, resume: bool = False, pause: str | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        self.pause_file = logs / "paused"
        self.log = logs / "cli.log"
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}
        if pause:
            self.env.update({"VZERO_PAUSE_AT": pause, "VZERO_PAUSE_FILE": str(self.pause_file)})
        self.pause_file.unlink(missing_ok=True)
        self.cmd = [sys.executable, "-m", "vzero.cli", "train", "--config", str(CONFIG)]
        self.cmd += [*(["--resume"] if resume else []), *overrides]
        self.pause = pause
        self.starts = 0
        self._launch()

    def _launch(self) -> None:
        self.starts += 1
        self._start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("a") as fh:
            fh.write(f"\n$ VZERO_PAUSE_AT={self.pause or ''} {' '.join(self.cmd)}\n")
            fh.flush()
            self.proc = subprocess.Popen(
                self.cmd, cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _relaunched(self) -> bool:
        """Start again if Ray itself could not start (its raylet gets 30 s, which a loaded machine can miss): that
        failure happens before the run touches output_dir, so it is no fault of the run under test."""
        if self.starts >= 3 or RAY_START_TIMEOUT not in self.output():
            return False
        kill_session(self.proc.pid)
        self._launch()
        return True

    def output(self) -> str:
        """What this run printed (the log holds every run of the test)."""
        with self.log.open() as fh:
            fh.seek(self._start)
            return fh.read()

    def wait_paused(self, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
        """Block until the driver holds at its pause point; what it wrote there (point, step, pid)."""
        deadline = time.monotonic() + timeout_s
        while not self.pause_file.exists():
            if self.proc.poll() is not None:
                if self._relaunched():
                    continue
                raise RuntimeError(
                    f"the run ended (rc {self.proc.returncode}) before pausing:\n{self.output()[-4000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"no pause within {timeout_s:.0f}s:\n{self.output()[-4000:]}")
            time.sleep(0.1)
        return json.loads(self.pause_file.read_text())

    def release(self) -> None:
        self.pause_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the driver, then every process left in its session (Ray's agents outlive a killed driver)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        kill_session(self.proc.pid)
        self.release()

    def wait(self, timeout_s: float = TIMEOUT_S) -> int:
        """The exit status of a run left to finish (or to fail); its session is cleared afterwards."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                rc = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise
            if rc == 0 or not self._relaunched():
                break
        kill_session(self.proc.pid)  # a clean exit leaves nothing, but a failed one may
        return rc


def session_pids(sid: int) -> list[int]:
    """Processes whose session id is `sid` (from /proc: the test's own children only)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state ppid pgrp session ...
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (pids := session_pids(sid)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def role_pid(sid: int, role: str) -> int:
    """The pid of the Ray actor process of `role` (e.g. "Learner") in session `sid`, found by its process title."""
    for pid in session_pids(sid):
        with contextlib.suppress(OSError):
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            if title.startswith("ray::") and role in title:
                return pid
    raise LookupError(f"no ray::{role} process in session {sid}")


def overrides(
    out: Path, model: Path, data: Path, *, mode: str = "async", steps: int = 6, extra: tuple[str, ...] = ()
) -> list[str]:
    """The fault runs' config on top of configs/tiny-cpu.yaml: transformers engines (deterministic on CPU), short
    responses, checkpoints every 2 steps, TensorBoard on, actors that may be restarted often."""
    return [
        f"output_dir={out}",
        f"data.path={data}",
        "data.synth=null",
        f"student.path={model}",
        "student.build=null",
        f"steps={steps}",
        f"seed={RUN_SEED}",
        f"mode={mode}",
        "max_staleness=1",
        "checkpoint.every=2",
        "checkpoint.keep_last=2",
        "rollout.engine=transformers",
        "teacher.engine=transformers",
        "rollout.max_tokens=8",
        "rollout.resources.max_restarts=50",
        "teacher.resources.max_restarts=50",
        "logging.progress_bar=false",
        "logging.tensorboard=true",
        "logging.ray_metrics=false",
        *extra,
    ]


def config(out: Path, model: Path, data: Path, **kwargs: Any):
    from vzero.config import load_config

    return load_config(CONFIG, overrides(out, model, data, **kwargs))


# -- actors killed at random moments (in this process: Ray is initialised, the driver runs here) ----------------------
def run_with_actor_kills(cfg: Any, *, kills: int, seed: int) -> dict[str, Any]:
    """Train `cfg` while a thread kills samplers and gating actors `kills` times (`ray.kill`, Ray restarts them):
    each after a random step was logged, a random delay later, a random victim, all drawn from `seed`. Returns the
    kills made and the faults the run counted."""
    import ray

    from vzero.driver import Run
    from vzero.metrics_log import read_metrics

    rng = random.Random(seed)
    run = Run(cfg)
    victims = {f"sampler-{i}": a for i, a in enumerate(run.samplers)}
    victims.update({f"gating-{i}": a for i, a in enumerate(run.gaters)})
    plan = sorted(
        (rng.randint(1, cfg.steps - 2), round(rng.uniform(0.0, 1.5), 2), rng.choice(sorted(victims)))
        for _ in range(kills)
    )
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    done: list[dict[str, Any]] = []

    def killer() -> None:
        for after_step, delay, name in plan:
            while not (metrics.is_file() and len(read_metrics(metrics)) >= after_step):
                if not loop.is_alive():
                    return
                time.sleep(0.02)
            time.sleep(delay)
            ray.kill(victims[name], no_restart=False)
            done.append({"after_step": after_step, "delay_s": delay, "actor": name})

    loop = threading.current_thread()
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        run.run()  # in the main thread: the driver installs its SIGTERM handler
    finally:
        thread.join(timeout=5)
        run.shutdown()
    logged = read_metrics(metrics)
    return {"kills": done, "planned": len(plan), "faults_counted": int(logged[-1]["faults/recovered"])}


# -- a full disk ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of `size_mb` at `path` (root only); unmounted afterwards. Raises PermissionError where not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0:
        raise PermissionError(f"cannot mount a tmpfs at {path}: {res.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(mount: Path, leave_bytes: int) -> Path:
    """Fill the filesystem of `mount` up to `leave_bytes` free (one filler file); delete the file to free it."""
    filler = mount / ".filler"
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with filler.open("ab") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))
    return filler


# -- comparing a faulted run with the reference --------------------------------------------------------------------
def _metrics_lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def tensorboard_values(tb: Path, tag: str = "loss") -> tuple[dict[int, float], dict[int, list[float]]]:
    """`tag` per step as TensorBoard's EventAccumulator shows it, and as a plain reader of every events file sees it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vzero.metrics_log import events_files, read_events

    shown = {s.step: s.value for s in EventAccumulator(str(tb), size_guidance={"scalars": 0}).Reload().Scalars(tag)}
    raw: dict[int, list[float]] = {}
    for path in events_files(tb):
        for event in read_events(path):
            raw.setdefault(event.step, []).extend(v.simple_value for v in event.summary.value if v.tag == tag)
    return shown, {k: v for k, v in raw.items() if v}


def _trajectory_rows(path: Path) -> list[dict[str, Any]]:
    rows = pq.read_table(path, columns=list(TRAJECTORY_COLUMNS)).to_pylist()
    return sorted(rows, key=lambda r: (r["uid"], r["sample_index"]))


def _quarantine(out: Path) -> list[tuple[int, str]]:
    from vzero.data.quarantine import REASON_COLUMN, ROW_COLUMN

    path = out / "quarantine.parquet"
    if not path.exists():
        return []
    table = pq.read_table(path, columns=[ROW_COLUMN, REASON_COLUMN])
    return sorted(zip(table.column(ROW_COLUMN).to_pylist(), table.column(REASON_COLUMN).to_pylist(), strict=True))


def _weights(checkpoint: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted((checkpoint / "model").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def differences(out: Path, ref: Path, *, steps: int, atol: float = 1e-6) -> list[str]:
    """Every way `out` is not what the uninterrupted run `ref` left (see the module docstring); [] = identical."""
    import math

    from vzero import checkpoint as ckpt

    diffs: list[str] = []
    got, want = _metrics_lines(out), _metrics_lines(ref)
    if [m["step"] for m in got] != list(range(1, steps + 1)):
        diffs.append(f"metrics.jsonl steps {[m['step'] for m in got]} (want one record per step 1..{steps})")
    for g, w in zip(got, want, strict=False):
        for key in SAME_METRICS:
            if g.get(key) != w.get(key):
                diffs.append(f"metrics step {g['step']}: {key} = {g.get(key)} (uninterrupted: {w.get(key)})")
    if (ref / "tb").is_dir():
        shown, raw = tensorboard_values(out / "tb")
        want_tb = {m["step"]: m["loss"] for m in want}
        if sorted(shown) != sorted(want_tb) or any(not math.isclose(shown[s], want_tb[s], rel_tol=1e-6) for s in shown):
            diffs.append(f"TensorBoard loss as EventAccumulator shows it: {shown} (want {want_tb})")
        doubled = {s: v for s, v in raw.items() if len(v) != 1}
        if doubled or sorted(raw) != sorted(want_tb):
            diffs.append(f"TensorBoard events files hold loss of steps {sorted(raw)}, repeated: {doubled}")
    names = sorted(p.name for p in (out / "trajectories").iterdir())
    if names != sorted(p.name for p in (ref / "trajectories").iterdir()):
        diffs.append(f"trajectories/ holds {names}")
    else:
        for name in names:
            if _trajectory_rows(out / "trajectories" / name) != _trajectory_rows(ref / "trajectories" / name):
                diffs.append(f"trajectories/{name} differs from the uninterrupted run's")
    if _quarantine(out) != _quarantine(ref):
        diffs.append(f"quarantine rows {_quarantine(out)} (uninterrupted: {_quarantine(ref)})")
    if (out / "quarantine.parquet.parts").exists():
        diffs.append("quarantine.parquet.parts/ left behind")
    got_ck = sorted(p.name for p in (out / "checkpoints").iterdir())
    want_ck = sorted(p.name for p in (ref / "checkpoints").iterdir())
    if got_ck != want_ck:
        diffs.append(f"checkpoints/ holds {got_ck} (uninterrupted: {want_ck})")
    final = ckpt.latest_valid_checkpoint(out / "checkpoints")
    if final is None or ckpt.checkpoint_step(final) != steps:
        diffs.append(f"final checkpoint {final}")
    else:
        mine, theirs = _weights(final), _weights(ref / "checkpoints" / final.name)
        worst = (
            max(float((mine[k].float() - theirs[k].float()).abs().max()) for k in theirs)
            if mine.keys() == theirs.keys()
            else None
        )
        if worst is None or worst > atol:
            diffs.append(f"final weights differ from the uninterrupted run's by {worst} (atol {atol})")
        pickled = [p.name for p in final.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        if pickled:
            diffs.append(f"the checkpoint holds pickle files {pickled}")
    return diffs
