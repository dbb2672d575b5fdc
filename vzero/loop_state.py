"""The driver's loop state that outlives one call: steps in flight, what a checkpoint keeps of them, which weight
pushes may still be sent, and the host RNG state.

- `InFlight`: a step whose prompts were drawn and whose rollouts were submitted, but which is not trained yet. It
  remembers the stream position before its prompts were drawn: a checkpoint stores the position of the OLDEST
  in-flight step (the first prompt not yet trained), never the stream's current one.
- `rollout_record` / `restore_trajectories`: an in-flight step's samples in a checkpoint (JSON). They were sampled by
  weights no checkpoint holds (async: older versions), so a resumed run trains exactly these samples.
- `pushes_to_keep`: the policy versions whose weight pushes a retry may still send. The learner frees the CUDA IPC
  buckets of every other version, so a handle the driver sends can never point at freed memory.

Knows nothing about Ray; the driver (vzero/driver.py) owns the actors.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vzero.records import Prompt, Trajectory

# What a sampler fills in: all a checkpoint needs to keep of an in-flight step's trajectories.
SAMPLED_FIELDS = ("uid", "sample_index", "policy_version", "prompt_ids", "response_ids", "lp_old", "finish_reason")


@dataclass
class InFlight:
    """A step whose rollouts have been submitted but not consumed yet."""

    step: int  # 0-based index of the step (it is logged as step + 1)
    prompts: list[Prompt]
    version: int  # the policy version every trajectory of this step must carry
    chunks: list[list[Prompt]]  # per sampler
    seeds: list[int]
    refs: list[Any]
    submitted_at: float
    stream_before: dict[str, Any]  # the stream's position before this step's prompts were drawn
    trajectories: list[Trajectory] | None = None  # the sampled batch, once collected (or restored from a checkpoint)
    gated: Any = None  # (trajectories, stats) once gated
    rollout_stats: dict[str, float] = field(default_factory=dict)


def rollout_record(job: InFlight) -> dict[str, Any]:
    """A collected in-flight step as a checkpoint keeps it (JSON: floats round-trip exactly)."""
    if job.trajectories is None:
        raise ValueError(f"step {job.step}: collect the rollout before recording it")
    return {
        "step": job.step,
        "version": job.version,
        "uids": [p.uid for p in job.prompts],
        "rollout_stats": job.rollout_stats,
        "trajectories": [{f: getattr(t, f) for f in SAMPLED_FIELDS} for t in job.trajectories],
    }


def restore_trajectories(record: dict[str, Any], prompts: list[Prompt], *, n: int, staleness: int) -> list | None:
    """The record's trajectories if they fit the re-drawn `prompts`, `n` samples each and the staleness bound
    (`staleness`: the most versions a batch may lag behind the learner that trains it), else None (sample again)."""
    trajectories = [Trajectory(**t) for t in record["trajectories"]]
    fits = (
        [p.uid for p in prompts] == record["uids"]
        and len(trajectories) == len(prompts) * n
        and record["step"] - record["version"] <= staleness
    )
    return trajectories if fits else None


def pushes_to_keep(inflight: list[InFlight], pushed_version: int, *, mode: str, transport: str) -> set[int]:
    """Versions whose pushes a retry may still send, right after `pushed_version` reached every sampler.

    A restarted sampler regenerates an uncollected in-flight batch with that batch's version; batches submitted next
    use the version just pushed. Sync mode under CUDA IPC drops the latter too (one model copy of GPU memory between
    pushes): the driver publishes it again if a sampler restarts, which is safe because a sync learner is idle, and
    still at that version, while the batch is sampled."""
    keep = {j.version for j in inflight if j.trajectories is None}
    if mode == "async" or transport != "cuda_ipc":
        keep.add(pushed_version)
    return keep


def host_rng_state() -> dict[str, Any]:
    """Python and NumPy global RNG states, JSON-serialisable."""
    return {
        "python_rng": random.getstate(),
        "numpy_rng": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
    }


def set_host_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `host_rng_state` (reads the same keys from a trainer_state.json)."""
    random.setstate(_tuplify(state["python_rng"]))
    x = state["numpy_rng"]
    np.random.set_state((x[0], np.asarray(x[1], dtype=np.uint32), *x[2:]))


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
