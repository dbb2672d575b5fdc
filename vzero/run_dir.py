"""What a run's `output_dir` holds, and the rules for starting a run in it.

- A fresh run (no `--resume`) into a directory that already holds a run (metrics, checkpoints or trajectories) is
  refused with a `ConfigError` naming `--resume` and a fresh `output_dir`, unless `overwrite` asks to delete the old
  run's outputs first: appending to another run's metrics and pruning its checkpoints would corrupt both.
- `--resume` of a run whose newest checkpoint already reached `steps` is finished: `finished_checkpoint` says so
  before any cluster is started.
- A resumed run rewinds the outputs to its checkpoint (`rewind_outputs`): metrics, trajectories and quarantined rows
  of steps trained after it (lost with the crash) are dropped, so the directory reads like one uninterrupted run.

Knows nothing about Ray or models.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vzero.checkpoint import checkpoint_step, latest_checkpoint
from vzero.config import ConfigError
from vzero.data.quarantine import ROW_COLUMN, parts_dir, recover

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TRAJECTORIES = "trajectories"
QUARANTINE = "quarantine.parquet"
# Everything a run writes under output_dir (config.yaml is rewritten by every start anyway).
OUTPUTS = (METRICS, CHECKPOINTS, TRAJECTORIES, "tb", QUARANTINE, f"{QUARANTINE}.parts", "config.yaml")


def previous_run(out: Path) -> list[str]:
    """What in `out` shows that a run already wrote there (empty: nothing, a fresh run may start)."""
    found = []
    if (out / METRICS).is_file() and (out / METRICS).stat().st_size > 0:
        found.append(METRICS)
    if (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).iterdir()):
        found.append(f"{CHECKPOINTS}/")
    if (out / TRAJECTORIES).is_dir() and any((out / TRAJECTORIES).glob("step_*.parquet")):
        found.append(f"{TRAJECTORIES}/")
    return found


def prepare_fresh(out: Path, *, overwrite: bool) -> None:
    """Make `out` ready for a run from step 0: refuse if it holds a run, or clear that run's outputs (`overwrite`)."""
    found = previous_run(out)
    if not found:
        return
    if not overwrite:
        raise ConfigError(
            f"output_dir {str(out)!r} already holds a run ({', '.join(found)}): continue it with --resume, choose a "
            "fresh output_dir, or pass --overwrite to delete that run's outputs first"
        )
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def finished_checkpoint(out: Path, steps: int) -> Path | None:
    """The newest checkpoint if it already reached `steps` (the run is finished), else None."""
    latest = latest_checkpoint(out / CHECKPOINTS)
    return latest if latest is not None and checkpoint_step(latest) >= steps else None


def rewind_outputs(out: Path, step: int, quarantined_rows: list[list]) -> None:
    """Drop metrics records and trajectory files of steps after `step` (trained, but not checkpointed), and the
    quarantined rows the checkpoint's stream does not know yet (`[[row, reason], ...]`: it meets them again)."""
    metrics = out / METRICS
    if metrics.is_file():
        lines = metrics.read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
        if len(kept) != len([ln for ln in lines if ln.strip()]):
            tmp = metrics.with_name(f".{METRICS}.tmp-{os.getpid()}")
            tmp.write_text("".join(f"{ln}\n" for ln in kept))
            os.replace(tmp, metrics)
    for path in (out / TRAJECTORIES).glob("step_*.parquet") if (out / TRAJECTORIES).is_dir() else ():
        if int(path.stem.split("_")[1]) > step:
            path.unlink()
    _rewind_quarantine(out / QUARANTINE, {int(row) for row, _ in quarantined_rows})


def _rewind_quarantine(path: Path, known: set[int]) -> None:
    if not path.exists() and not parts_dir(path).is_dir():
        return
    recover(path)  # a crashed writer's parts first
    if not path.exists():
        return
    table = pq.read_table(path)
    kept = table.filter(pc.is_in(table[ROW_COLUMN], value_set=pa.array(sorted(known), type=pa.int64())))
    if kept.num_rows != table.num_rows:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(kept, tmp)
        os.replace(tmp, path)
