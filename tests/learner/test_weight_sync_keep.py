"""CUDA IPC weight pushes stay valid while the driver may still send them (needs a GPU; skipped elsewhere).

A sampler restarted after a fault is re-sent an older push; its handles must still map that push's weights, not
memory the learner freed and the allocator has since handed to a newer push.
"""

from __future__ import annotations

import pytest
import torch

from actors.weight_receiver import receive
from learner.weight_sync import WeightSender

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _named(fill: float) -> list[tuple[str, torch.Tensor]]:
    return [(f"layer.{i}.weight", torch.full((256, 256), fill + i, device="cuda")) for i in range(4)]


def test_a_kept_push_still_maps_its_own_weights_after_newer_pushes() -> None:
    sender = WeightSender("cuda_ipc", bucket_bytes=1 << 20)
    first = sender.make_push(_named(1.0), version=1)
    sender.release(keep=[1])  # the driver still needs version 1 (an in-flight batch of that version)
    for v in (2, 3):
        sender.make_push(_named(float(10 * v)), version=v)
        sender.release(keep=[1, v])
    assert sender.alive_versions() == [1, 3]
    for name, t in _named(1.0):
        assert torch.equal(dict(receive(first, "cuda"))[name], t), name
    sender.release(keep=[3])
    assert sender.alive_versions() == [3]
