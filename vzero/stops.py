"""Failures that stop a training run instead of being retried, and the one message each ends with.

A sampler or gating actor that dies is restarted by Ray and its work redone (vzero/cluster.py `call_with_retry`).
Two failures no retry repairs; `stopped_error` turns them into what `vzero train` reports without a traceback:
- a full disk (vzero/run_dir.py `disk_full`): a `UserError` (exit status 2) naming the path, the free space and the
  intact checkpoint;
- the learner's death (any rank of a learner group): its trained weights exist only in the last checkpoint (a
  restarted learner would be back at the initial weights, so it is spawned with `max_restarts=0`): a `RunStopped`
  (exit status 3).
Both say to rerun with `--resume`, which continues from the last complete checkpoint. `reported(run)` wraps the
driver's loop: it raises those errors in place of the originals and closes the run's files either way, without
letting a second error (the same full disk) hide the first. Reads a few attributes of the run, never drives it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vzero import run_dir
from vzero.cluster import ACTOR_ERRORS
from vzero.errors import RunStopped, causes

log = logging.getLogger("vzero")


def actor_ids(handle: Any) -> set[str]:
    """The Ray actor ids behind a role: one actor handle, or a learner.group.LearnerGroup (its FSDP `ranks`)."""
    return {h._actor_id.hex() for h in getattr(handle, "ranks", None) or [handle]}


def died(exc: BaseException, handle: Any) -> bool:
    """`exc` (or an error in its chain) says the actor(s) of `handle` died."""
    dead = {getattr(e, "actor_id", None) for e in causes(exc) if isinstance(e, ACTOR_ERRORS)}
    return bool(dead & actor_ids(handle))


def resume_hint(step: int, saved: tuple[int, Path] | None) -> str:
    """Where the run stopped and how to continue it."""
    where = f"checkpoint {saved[1]}" if saved else "the start (no checkpoint was written yet)"
    return f"training stopped after step {step}; rerun the same command with --resume to continue from {where}"


def stopped_error(
    exc: BaseException, *, out: Path, step: int, saved: tuple[int, Path] | None, learner: Any
) -> Exception | None:
    """The user-facing error for a failure no retry repairs (a full disk, a dead learner), else None."""
    full = run_dir.disk_full(exc)
    if full is not None:
        return run_dir.disk_full_error(out, full, step=step, checkpoint=saved[1] if saved else None)
    if died(exc, learner):
        return RunStopped(f"{resume_hint(step, saved)}: the learner died ({type(exc).__name__})")
    return None


def close_outputs(closers: list[Callable[[], None]], *, quiet: bool) -> None:
    """Call each closer; while a failure propagates (`quiet`), their own errors are logged, never raised over it."""
    for close in closers:
        try:
            close()
        except Exception:
            if not quiet:
                raise
            log.warning("closing the run's outputs failed as well", exc_info=True)


@contextlib.contextmanager
def reported(run: Any) -> Iterator[None]:
    """Around the loop of `run` (a vzero.driver.Run: reads out, step, saved, learner, metrics, quarantine): a failure
    no retry repairs is raised as its user-facing error (`stopped_error`); the run's outputs are closed either way."""
    failed = True
    try:
        yield
        failed = False
    except Exception as exc:
        stop = stopped_error(exc, out=run.out, step=run.step, saved=run.saved, learner=run.learner)
        if stop is None:
            raise
        raise stop from exc
    finally:
        close_outputs([run.metrics.close, run.quarantine.close], quiet=failed)
