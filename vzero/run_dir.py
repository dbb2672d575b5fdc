"""What a run's `output_dir` holds, and the rules for starting a run in it.

- A fresh run (no `--resume`) into a directory that already holds a run (metrics, checkpoints or trajectories) is
  refused with a `ConfigError` naming `--resume` and a fresh `output_dir`, unless `overwrite` asks to delete the old
  run's outputs first: appending to another run's metrics and pruning its checkpoints would corrupt both.
- `--resume` of a run whose newest checkpoint already reached `steps` is finished: `finished_checkpoint` says so
  before any cluster is started.
- A resumed run rewinds the outputs to its checkpoint (`rewind_outputs`): metrics lines, TensorBoard events,
  trajectory files and quarantined rows of steps trained after it (lost with the crash) are dropped, and so are the
  leftovers of writes a crash interrupted (a metrics line cut short, `*.tmp` files, `.tmp-*` checkpoint directories),
  so the directory reads like one uninterrupted run: one record per step, each bad row once. Every part of the rewind
  is idempotent, so a crash during it is repaired by the next resume.
- A disk that fills up stops the run with a `UserError` (`disk_full_error`: the path, the free space, the intact
  checkpoint, "free space, then --resume") instead of a traceback from whichever write hit it first.

Knows nothing about Ray or models.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vzero.checkpoint import checkpoint_step, latest_valid_checkpoint, remove_partial
from vzero.config import ConfigError
from vzero.data.quarantine import ROW_COLUMN, parts_dir, recover
from vzero.errors import UserError, causes
from vzero.metrics_log import METRICS_FILE, TB_DIR, rewind_metrics, rewind_tensorboard

log = logging.getLogger("vzero")
METRICS = METRICS_FILE
CHECKPOINTS = "checkpoints"
TRAJECTORIES = "trajectories"
QUARANTINE = "quarantine.parquet"
# Everything a run writes under output_dir (config.yaml is rewritten by every start anyway).
OUTPUTS = (METRICS, CHECKPOINTS, TRAJECTORIES, TB_DIR, QUARANTINE, f"{QUARANTINE}.parts", "config.yaml")


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
    """The newest loadable checkpoint if it already reached `steps` (the run is finished), else None."""
    latest = latest_valid_checkpoint(out / CHECKPOINTS)
    return latest if latest is not None and checkpoint_step(latest) >= steps else None


def rewind_outputs(out: Path, step: int, quarantined_rows: list[list]) -> None:
    """Drop the metrics records, TensorBoard events and trajectory files of steps after `step` (trained, but not
    checkpointed), the quarantined rows the checkpoint's stream does not know yet (`[[row, reason], ...]`: it meets
    them again), and what interrupted writes left behind."""
    dropped = rewind_metrics(out / METRICS, step)
    dropped_tb = rewind_tensorboard(out / TB_DIR, step)
    trajectories = out / TRAJECTORIES
    stale = [p for p in trajectories.glob("step_*.parquet") if int(p.stem.split("_")[1]) > step]
    stale += list(trajectories.glob("*.tmp"))  # a write a crash interrupted (complete files are renamed in)
    for path in stale:
        path.unlink()
    partial = remove_partial(out / CHECKPOINTS)
    _rewind_quarantine(out / QUARANTINE, {int(row) for row, _ in quarantined_rows})
    if dropped or dropped_tb or stale or partial:
        log.info(
            "resume: rewound %s to step %d (dropped %d metrics records, %d TensorBoard events, %d trajectory files, "
            "%d unfinished checkpoint(s))",
            out,
            step,
            dropped,
            dropped_tb,
            len(stale),
            len(partial),
        )


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull")  # libraries that only say it


def disk_full(exc: BaseException) -> BaseException | None:
    """The out-of-space error behind `exc`, else None: an OSError with ENOSPC / EDQUOT anywhere in its chain (also one
    raised inside an actor: Ray's `RayTaskError` carries it as `.cause`), or an error whose text says so (safetensors
    reports a full disk as a `SafetensorError` message)."""
    chain = causes(exc)
    for e in chain:
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return e
    return next((e for e in chain if any(t in str(e) for t in _NO_SPACE_TEXT)), None)


def disk_full_error(out: Path, exc: BaseException, *, step: int, checkpoint: Path | None) -> UserError:
    """The message for a run stopped by a full disk: what could not be written, the free space, what is intact."""
    path = getattr(exc, "filename", None) or out
    try:
        free = f"{shutil.disk_usage(out).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    kept = f"its last complete checkpoint {checkpoint} is intact" if checkpoint else "no checkpoint was completed yet"
    return UserError(
        f"no space left on the device of {path} ({free} on the disk of output_dir {out}): the run stopped after step "
        f"{step} and {kept}. Free space there, then rerun the same command with --resume"
    )


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
