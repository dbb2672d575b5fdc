"""Running the prior-trap experiment's many label-free runs on one shared, possibly overloaded machine.

`cpu_threads` pins this process's torch threads, `start_cluster` starts the local Ray cluster every run reuses (the
driver connects to an already running one), `train_with_retries` runs one `toy.train_run` and starts it again from
scratch when an actor died under it, `git_commit` records the code the results came from. None of this changes what
a run computes: a run is deterministic per (overrides, seed), and an unfinished run directory is removed before a
run starts again (`toy.train_run`).
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

from vzero.recipes.toy import BASE_CONFIG, REPO

log = logging.getLogger("vzero")


def git_commit() -> str | None:
    """HEAD of the checkout the recipe runs from, or None outside a git checkout."""
    try:
        res = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        return res.stdout.strip() or None
    except OSError:
        return None


def cpu_threads(device: str, threads: int) -> None:
    """`threads` torch threads in this process on CPU. Measured on the shared 2-core machine at load ~40: 30 SFT steps
    took 22.5 s with 1 thread and 382 s with 2 (OpenMP threads wait for each other's time slices)."""
    if device == "cpu":
        import torch

        torch.set_num_threads(threads)


def start_cluster(overrides: list[str], attempts: int = 4) -> None:
    """Start the local Ray cluster the runs share; retried because on an overloaded machine the raylet can miss
    Ray's fixed 30 s registration deadline ("The current node timed out during startup")."""
    import ray

    from vzero.cluster import connect
    from vzero.config import load_config

    cfg = load_config(BASE_CONFIG, overrides)
    for attempt in range(1, attempts + 1):
        try:
            connect(cfg)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            log.warning("local Ray cluster did not start (attempt %d/%d): %s; retrying", attempt, attempts, e)
            ray.shutdown()
            time.sleep(10 * attempt)


def train_with_retries(overrides: list[str], attempts: int = 3) -> tuple[Path, float]:
    """`toy.train_run`, started again from scratch (it is deterministic per seed) when an actor died under it: on the
    shared, overloaded machine a learner was once restarted mid-step ("The actor was restarted")."""
    import ray

    from vzero.errors import RunStopped
    from vzero.recipes.toy import train_run

    for attempt in range(1, attempts + 1):
        try:
            return train_run(overrides)
        except (ray.exceptions.RayError, RuntimeError, RunStopped) as e:  # RunStopped: the driver's "a learner died"
            if attempt == attempts:
                raise
            log.warning("run failed (attempt %d/%d), starting it again: %s", attempt, attempts, str(e)[:300])
    raise AssertionError("unreachable")
