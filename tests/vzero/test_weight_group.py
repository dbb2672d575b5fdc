"""The collective transport's wire (vzero/weight_group.py) between real processes over gloo, without Ray.

Invariants: every bucket arrives intact and in order (also with the receive-ahead thread); a receiver expecting
another push version fails loudly instead of loading it; a sender whose peer died reports that group as failed
and still delivers the whole push to the other group; a receiver whose sender never comes fails by the timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from vzero.weight_group import GroupSpec, WeightGroup, free_port, receive_buckets, send_buckets
from vzero.weights import BucketPlan, pack_buckets

CTX = mp.get_context("spawn")
pytestmark = pytest.mark.slow  # spawned processes import torch and vLLM


def _named() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = [(f"layer.{i}.weight", torch.randn(64, 32 + i, generator=g)) for i in range(12)]
    return [*out, ("norm.weight", torch.randn(7, generator=g).to(torch.bfloat16))]


def _buckets():
    return pack_buckets(_named(), bucket_bytes=20_000)  # several buckets: the receive-ahead path


def _warm(ready) -> None:
    """Import what joining needs before the rendezvous clock starts (a spawned child imports torch + vLLM)."""
    import vllm.distributed.utils  # noqa: F401

    ready.set()


def _receiver(spec: GroupSpec, version: int, out, ready) -> None:
    try:
        _warm(ready)
        group = WeightGroup(spec, 1)
        plan = [BucketPlan(b.metas, b.nbytes) for b in _buckets()]
        out.put([(n, t.float().sum().item(), str(t.dtype)) for n, t in receive_buckets(group, plan, version)])
    except Exception as exc:
        out.put(f"{type(exc).__name__}: {exc}")


def _dying_receiver(spec: GroupSpec, ready) -> None:
    _warm(ready)
    WeightGroup(spec, 1)  # joins, then exits before the push


def _start(target, *args):
    ready = CTX.Event()
    proc = CTX.Process(target=target, args=(*args, ready))
    proc.start()
    assert ready.wait(timeout=300), "the child process did not start"
    return proc


def _spec(timeout_s: float = 60.0) -> GroupSpec:
    return GroupSpec("127.0.0.1", free_port("127.0.0.1"), 2, "gloo", timeout_s)


def test_a_push_arrives_intact_in_order_and_version_checked() -> None:
    expected = [(n, t.float().sum().item(), str(t.dtype)) for n, t in _named()]
    buckets = _buckets()
    assert len(buckets) > 2
    for version_sent, version_expected in ((3, 3), (3, 4)):
        spec, out = _spec(), CTX.Queue()
        proc = _start(_receiver, spec, version_expected, out)
        group = WeightGroup(spec, 0)
        failed = send_buckets({"sampler-0": group}, buckets, version_sent)
        got = out.get(timeout=60)
        proc.join(timeout=60)
        group.close()
        if version_sent == version_expected:
            assert failed == {} and got == expected
        else:
            assert isinstance(got, str) and "weight push out of step" in got and "[4, 0," in got


def test_a_dead_peer_fails_only_its_own_group_and_a_missing_sender_times_out() -> None:
    buckets = _buckets()
    dead_spec, live_spec, out = _spec(), _spec(), CTX.Queue()
    dying = _start(_dying_receiver, dead_spec)
    live = _start(_receiver, live_spec, 5, out)
    dead, alive = WeightGroup(dead_spec, 0), WeightGroup(live_spec, 0)
    dying.join(timeout=60)
    failed = send_buckets({"sampler-0": dead, "sampler-1": alive}, buckets, 5)
    assert list(failed) == ["sampler-0"]
    assert out.get(timeout=60) == [(n, t.float().sum().item(), str(t.dtype)) for n, t in _named()]
    live.join(timeout=60)

    spec = _spec(timeout_s=3.0)  # the sender joins, then never sends: the receiver gives up after the timeout
    proc = _start(_receiver, spec, 1, out)
    silent = WeightGroup(spec, 0)  # kept alive: a closed socket would fail the receiver before the timeout
    t0 = time.monotonic()
    got = out.get(timeout=60)
    silent.close()
    assert isinstance(got, str) and "imed out" in got, got
    assert time.monotonic() - t0 < 30
    proc.join(timeout=60)


@pytest.mark.parametrize("backend", ["mpi"])
def test_unknown_backend_is_refused(backend: str) -> None:
    with pytest.raises(ValueError, match="unknown weight-group backend 'mpi'"):
        WeightGroup(GroupSpec("127.0.0.1", 1, 2, backend, 1.0), 0)
