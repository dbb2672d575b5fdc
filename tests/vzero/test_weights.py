"""Weight-push buckets: exact round trip for every dtype, size bounds, and transport checks on the receiving end."""

from __future__ import annotations

import pytest
import torch

from actors.weight_receiver import receive
from learner.weight_sync import WeightSender
from vzero.weights import IpcBucket, ParamMeta, WeightPush, pack_buckets, total_bytes, unpack_bucket


def _named():
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(7, 3, generator=g)),
        ("b.bias", torch.randn(5, generator=g).to(torch.bfloat16)),
        ("c.weight", torch.randn(100, 100, generator=g).to(torch.float16)),
        ("d.scale", torch.tensor(3.5, dtype=torch.float64)),
        ("e.ids", torch.arange(9, dtype=torch.int64).view(3, 3)),
    ]


def test_buckets_round_trip_bit_exactly_and_respect_the_size_bound() -> None:
    named = _named()
    buckets = pack_buckets(named, bucket_bytes=1024)
    assert len(buckets) >= 3, "the 20 kB tensor gets its own bucket, the small ones share"
    assert all(b.nbytes <= 1024 or len(b.metas) == 1 for b in buckets)
    out = [pair for b in buckets for pair in unpack_bucket(b)]
    assert [n for n, _ in out] == [n for n, _ in named]
    for (_, a), (_, b) in zip(named, out, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert total_bytes(buckets) == sum(t.numel() * t.element_size() for _, t in named)


def test_object_store_push_is_cpu_buckets_and_receive_yields_the_tensors() -> None:
    push = WeightSender("object_store", bucket_bytes=4096).make_push(_named(), version=3)
    assert push.version == 3 and push.ipc is None and all(b.buffer.device.type == "cpu" for b in push.buckets)
    got = dict(receive(push, "cpu"))
    for name, t in _named():
        assert torch.equal(got[name], t)
    assert push.nbytes == sum(t.numel() * t.element_size() for _, t in _named())


def test_ipc_push_is_refused_on_another_device_with_the_knob_to_turn() -> None:
    push = WeightPush(1, ipc=[IpcBucket([ParamMeta("x", torch.float32, (1,), 0)], (None, ()), "GPU-1234")])
    with pytest.raises(RuntimeError, match=r"learner\.weight_transport=object_store"):
        list(receive(push, "cpu"))


def test_unknown_transport_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown weight transport 'nccl'"):
        WeightSender("nccl")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ipc_push_maps_the_same_memory() -> None:
    named = [(n, t.cuda()) for n, t in _named()]
    push = WeightSender("cuda_ipc").make_push(named, version=1)
    got = dict(receive(push, "cuda"))
    for name, t in named:
        assert torch.equal(got[name], t)
