"""Faults on purpose, and what they cost: the driver SIGKILLed at every named point, a damaged checkpoint, a dead
learner, a full disk, samplers and gating actors killed at random moments; after each scenario, what was lost or
doubled against an uninterrupted run of the same config (the answer must be: nothing). Writes JSON with its command.

    scripts/loopback.sh python -m bench.faults --out bench/results/faults-cpu.json \
        [--modes sync async] [--steps 12] [--seeds 0 1] [--kills 6]

As root for the full-disk scenario (it mounts a small tmpfs; skipped, and said so in the JSON, otherwise). Per mode:
one uninterrupted reference run, then
- "hard kills": one output_dir taken through SIGKILLs of the driver at rollout@3, learn@5, logged@7, checkpoint@8, a
  truncated newest checkpoint plus a SIGKILL while committing over it, a SIGKILL while writing the final checkpoint,
  a SIGKILL of the learner process (exit status 3), each followed by `--resume`;
- "disk full": the disk fills while checkpoint 4 is written (exit status 2), space comes back, `--resume`;
- "actor kills (seed s)": `--kills` random `ray.kill`s of samplers and the gating actor.
The CI suite runs a reduced form (tests/integration/test_faults.py); the machinery is bench/fault_harness.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fault_harness import REPO, Cli, config, differences, fill, overrides, role_pid, run_with_actor_kills, tmpfs


def _stage(fault: str, cli: Cli, *, learner: bool = False) -> dict[str, Any]:
    """Wait for the run to hold, then SIGKILL the driver (or the learner process, and let the driver go on)."""
    t0 = time.perf_counter()
    held = cli.wait_paused()
    if learner:
        os.kill(role_pid(cli.proc.pid, "Learner"), signal.SIGKILL)
        cli.release()
        rc = cli.wait()
    else:
        cli.kill()
        rc = -signal.SIGKILL
    errors = [ln for ln in cli.output().splitlines() if ln.startswith("error:")]
    out = {"fault": fault, "held_at": f"{held['point']}@{held['step']}", "rc": rc, "seconds": time.perf_counter() - t0}
    return {**out, "error": errors[-1] if errors else None}


def hard_kills(out: Path, logs: Path, args: list[str], steps: int) -> list[dict[str, Any]]:
    from vzero.checkpoint import checkpoint_step, latest_valid_checkpoint

    stages = [
        _stage(f"SIGKILL of the driver at {point}", Cli(logs, args, resume=i > 0, pause=point))
        for i, point in enumerate(["rollout@3", "learn@5", "logged@7", "checkpoint@8"])
    ]
    newest = latest_valid_checkpoint(out / "checkpoints")
    assert newest is not None
    weights = newest / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    pause = f"commit@{checkpoint_step(newest)}"
    stages.append(
        _stage(f"{newest.name} truncated, then SIGKILL at {pause}", Cli(logs, args, resume=True, pause=pause))
    )
    pause = f"checkpoint@{steps}"
    stages.append(_stage(f"SIGKILL of the driver at {pause} (final)", Cli(logs, args, resume=True, pause=pause)))
    pause = f"learn@{steps}"
    cli = Cli(logs, args, resume=True, pause=pause)
    stages.append(_stage(f"SIGKILL of the learner process at {pause}", cli, learner=True))
    stages.append({"fault": None, "resume_to_the_end_rc": Cli(logs, args, resume=True).wait()})
    return stages


def disk_full(root: Path, make_args, steps: int, compare) -> dict[str, Any]:
    try:
        mount = tmpfs(root / "disk", size_mb=96)
        disk = mount.__enter__()
    except PermissionError as exc:
        return {"scenario": "disk full", "skipped": str(exc)}
    try:
        t0 = time.perf_counter()
        out, logs = disk / "run", root / "logs-disk"
        args = make_args(out)
        cli = Cli(logs, args, pause="logged@4")
        cli.wait_paused()
        filler = fill(disk, leave_bytes=256 * 1024)
        cli.release()
        rc = cli.wait()
        errors = [ln for ln in cli.output().splitlines() if ln.startswith("error:")]
        filler.unlink()
        resumed = Cli(logs, args, resume=True).wait()
        faults = [
            {"fault": "disk full while checkpoint 4 is written", "rc": rc, "error": errors[-1] if errors else None},
            {"fault": None, "resume_to_the_end_rc": resumed},
        ]
        return compare("disk full", out, faults, t0)
    finally:
        mount.__exit__(None, None, None)


def mode_matrix(mode: str, base: Path, model: Path, data: Path, args: argparse.Namespace, runs: list) -> None:
    """Append each scenario's result to `runs` as it finishes (`runs.append` may write the JSON so far)."""
    from vzero.driver import train

    kw = dict(mode=mode, steps=args.steps)
    ref_cfg = config(base / "ref", model, data, **kw)
    train(ref_cfg)
    ref = Path(ref_cfg.output_dir)

    def compare(scenario: str, out: Path, faults: Any, t0: float) -> dict[str, Any]:
        lost = differences(out, ref, steps=args.steps)
        run = {"mode": mode, "scenario": scenario, "faults": faults, "lost_or_doubled": lost, "nothing_lost": not lost}
        print(json.dumps(run, default=str), flush=True)
        return {**run, "seconds": round(time.perf_counter() - t0, 1)}

    t0 = time.perf_counter()
    out = base / "chain" / "run"
    runs.append(
        compare("hard kills", out, hard_kills(out, base / "chain", overrides(out, model, data, **kw), args.steps), t0)
    )
    runs.append({"mode": mode, **disk_full(base, lambda o: overrides(o, model, data, **kw), args.steps, compare)})
    for seed in args.seeds:
        t0 = time.perf_counter()
        cfg = config(base / f"actors-{seed}" / "run", model, data, **kw)
        report = run_with_actor_kills(cfg, kills=args.kills, seed=seed)
        runs.append(compare(f"actor kills (seed {seed})", Path(cfg.output_dir), report, t0))


class _Saved(list):
    """The result's list of runs: each append rewrites the JSON, so a matrix stopped early keeps what it finished."""

    def __init__(self, result: dict[str, Any], out: Path):
        super().__init__()
        self.result, self.out = result, out
        result["runs"] = self

    def append(self, run: dict[str, Any]) -> None:
        super().append(run)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({**self.result, "finished": False}, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--modes", nargs="+", default=["sync", "async"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the random actor kills")
    ap.add_argument("--kills", type=int, default=6, help="actor kills per run")
    args = ap.parse_args(argv)
    if args.steps < 10:
        ap.error("--steps must be >= 10 (the hard kills reach checkpoint 8)")
    import ray

    from vzero.data.bad_rows import write_bad_rows_file
    from vzero.models.tiny import build_model

    command = ["python", "-m", "bench.faults", "--out", str(args.out), "--modes", *args.modes]
    command += ["--steps", str(args.steps), "--seeds", *map(str, args.seeds), "--kills", str(args.kills)]
    result: dict[str, Any] = {"what": __doc__.splitlines()[0], "command": " ".join(command), "runs": []}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vzero-bench-faults-") as tmp_name:
        tmp = Path(tmp_name)
        model = build_model(tmp / "tiny", arch="qwen2_vl", preset="tiny", seed=0)
        data = tmp / "bad-10k.parquet"
        write_bad_rows_file(data, 10_000, bad_fraction=0.05, seed=0)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        env = {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
        ray.init(
            address="local",
            num_cpus=6,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": env},
        )
        runs = _Saved(result, args.out)
        try:
            for mode in args.modes:
                mode_matrix(mode, tmp / mode, model, data, args, runs)
        finally:
            ray.shutdown()
    result.update(
        {
            "finished": True,
            "nothing_lost_anywhere": all(r.get("nothing_lost", True) for r in result["runs"]),
            "seconds": round(time.perf_counter() - t_all, 1),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["nothing_lost_anywhere"] else 1


if __name__ == "__main__":
    sys.exit(main())
