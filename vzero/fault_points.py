"""Named points of the training loop where a test can hold the driver, to kill it (SIGKILL) or fill its disk at a
known moment. Inert unless `VZERO_PAUSE_AT` is set; the fault tests (tests/integration/test_faults.py,
bench/faults.py) are the only users.

    VZERO_PAUSE_AT=learn@5,checkpoint@6     where to hold: <point>@<step> (steps counted from 1, as logged)
    VZERO_PAUSE_FILE=/tmp/x/paused          the file the driver writes when it holds (JSON: point, step, pid)

At a listed point the driver writes `VZERO_PAUSE_FILE` and waits while that file exists: the test then SIGKILLs the
process (the state on disk is exactly that of a crash at this point), or changes the world (fills the disk, kills an
actor) and deletes the file to let the driver go on. Each listed point holds once per process.

Points (`POINTS`), in the order one step passes them:
  rollout     the step's rollouts are submitted; the driver is about to wait for them (samplers are generating)
  learn       the step's batch is on the learner (`train_step` submitted, its result not yet read)
  logged      the step's metrics, TensorBoard events and trajectories are written; its checkpoint (if due) is not
  checkpoint  a checkpoint of the step is being written: the learner's model and optimizer files are in the
              temporary directory, the trainer state and the COMPLETE marker are not
  commit      `checkpoint.commit` has moved an older copy of the same step aside, the new one is not in place yet
              (only for a step that already had a checkpoint)
Knows nothing about Ray or training.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

POINTS = ("rollout", "learn", "logged", "checkpoint", "commit")
ENV_AT = "VZERO_PAUSE_AT"
ENV_FILE = "VZERO_PAUSE_FILE"
_held: set[tuple[str, int]] = set()  # each listed point holds once per process


def wanted() -> set[tuple[str, int]]:
    """The (point, step) pairs `VZERO_PAUSE_AT` lists (empty when unset); an unknown point is an error."""
    spec = os.environ.get(ENV_AT, "").strip()
    out = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, step = item.partition("@")
        if point not in POINTS or not step.isdigit():
            raise ValueError(f"{ENV_AT}: {item!r} is not <point>@<step> with a point in {POINTS}")
        out.add((point, int(step)))
    return out


def reached(point: str, step: int) -> None:
    """Hold here if `VZERO_PAUSE_AT` lists (point, step): write the pause file, wait until it is deleted."""
    if not os.environ.get(ENV_AT):
        return
    if (point, step) not in wanted() or (point, step) in _held:
        return
    _held.add((point, step))
    path = Path(os.environ[ENV_FILE])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"point": point, "step": step, "pid": os.getpid()}))
    os.replace(tmp, path)  # whole or absent: the test reads it as soon as it appears
    while path.exists():
        time.sleep(0.05)
