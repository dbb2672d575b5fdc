"""The driver's loop state: which weight pushes stay valid, and what a checkpoint keeps of the steps in flight.

Invariants: a push the driver may still send (a restarted sampler regenerating an in-flight batch, or the batches
submitted next) is never released, so no CUDA IPC handle it sends can point at freed GPU memory; an in-flight step's
samples round-trip a checkpoint exactly (JSON), and are only restored when they still fit the run.
"""

from __future__ import annotations

import json

import pytest

from vzero.loop_state import InFlight, pushes_to_keep, restore_trajectories, rollout_record
from vzero.records import Prompt, Trajectory


def _job(step: int, version: int, *, collected: bool) -> InFlight:
    prompts = [Prompt(uid=f"p{step}", image=b"", question="q", evidence_box=(0, 0, 1, 1))]
    trajs = [Trajectory(f"p{step}", 0, version, [1, 2], [3, 4], [-0.1, -(0.1 + 0.2)], "stop")] if collected else None
    return InFlight(step, prompts, version, [], [], [], 0.0, {}, trajs)


@pytest.mark.parametrize("transport", ["object_store", "cuda_ipc"])
def test_async_keeps_every_version_a_retry_may_send(transport) -> None:
    inflight = [_job(3, 1, collected=True), _job(4, 2, collected=False), _job(5, 2, collected=False)]
    # the collected batch needs no weights any more; the uncollected ones need version 2; new batches version 4
    assert pushes_to_keep(inflight, 4, mode="async", transport=transport) == {2, 4}


def test_sync_keeps_the_pushed_version_except_gpu_memory_under_cuda_ipc() -> None:
    assert pushes_to_keep([], 7, mode="sync", transport="object_store") == {7}
    # CUDA IPC: the buckets are GPU memory; a restarted sampler gets version 7 published again (the learner is idle
    # and still at 7 while a sync batch is sampled), never a handle to released buckets
    assert pushes_to_keep([], 7, mode="sync", transport="cuda_ipc") == set()


def test_in_flight_samples_round_trip_a_checkpoint_exactly() -> None:
    job = _job(4, 2, collected=True)
    job.rollout_stats = {"rollout/tokens": 2.0}
    record = json.loads(json.dumps(rollout_record(job)))
    assert restore_trajectories(record, job.prompts, n=1, staleness=2) == job.trajectories
    assert restore_trajectories(record, job.prompts, n=1, staleness=1) is None, "beyond this run's staleness bound"
    assert restore_trajectories(record, job.prompts, n=2, staleness=2) is None, "another rollout.n"
    with pytest.raises(ValueError, match="collect the rollout"):
        rollout_record(_job(5, 2, collected=False))
