"""What travels with a weight push, shared by the sender (learner/weight_sync.py) and the receivers
(actors/sampler.py, actors/weight_receiver.py), so the two ends cannot drift.

A push is a list of buckets; each bucket is one flat uint8 buffer holding several tensors back to back plus the
`ParamMeta` (HF name, dtype, shape, byte offset) of each. Bucketing (512 MB by default, as the authors' launcher does)
turns ~800 small transfers into a handful of large ones and bounds the extra memory a push needs. The buffer itself
travels as a CPU tensor through the Ray object store, as a CUDA IPC handle when sender and receiver share a GPU, or
over a process group (`collective`, vzero/weight_group.py): then only the `BucketPlan`s travel through Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 512 << 20
_ALIGN = 16  # byte alignment of each tensor inside a bucket (safe for every dtype's view)


@dataclass(frozen=True)
class ParamMeta:
    name: str  # HF checkpoint name, e.g. "model.language_model.layers.0.mlp.up_proj.weight"
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # byte offset inside the bucket

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Bucket:
    metas: list[ParamMeta]
    buffer: torch.Tensor  # flat uint8, on the sender's device (or a CUDA IPC handle in transit)

    @property
    def nbytes(self) -> int:
        return int(self.buffer.numel())


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def pack_buckets(
    named: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, device=None
) -> list[Bucket]:
    """Copy tensors into flat uint8 buckets of at most `bucket_bytes` (a larger tensor gets a bucket of its own)."""
    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in named:
        n = _align(t.numel() * t.element_size())
        if groups[-1] and size + n > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, t))
        size += n
    buckets = []
    for group in groups:
        if not group:
            continue
        dev = device if device is not None else group[0][1].device
        total = sum(_align(t.numel() * t.element_size()) for _, t in group)
        buffer = torch.empty(total, dtype=torch.uint8, device=dev)
        metas, offset = [], 0
        for name, t in group:
            nbytes = t.numel() * t.element_size()
            buffer[offset : offset + nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
            metas.append(ParamMeta(name, t.dtype, tuple(t.shape), offset))
            offset += _align(nbytes)
        buckets.append(Bucket(metas, buffer))
    return buckets


def unpack_bucket(bucket: Bucket) -> Iterator[tuple[str, torch.Tensor]]:
    """Views into the bucket's buffer (no copy): valid as long as the buffer lives."""
    for m in bucket.metas:
        yield m.name, bucket.buffer[m.offset : m.offset + m.nbytes].view(m.dtype).view(m.shape)


def total_bytes(buckets: list[Bucket]) -> int:
    return sum(m.nbytes for b in buckets for m in b.metas)


@dataclass
class IpcBucket:
    """A bucket whose buffer is a CUDA IPC handle: (rebuild function, args) from `reduce_tensor`."""

    metas: list[ParamMeta]
    handle: tuple
    device_uuid: str  # the GPU the memory lives on: a receiver on another GPU must not use the handle


@dataclass
class BucketPlan:
    """What one bucket of a collective push holds; the bytes themselves come over the weight group."""

    metas: list[ParamMeta]
    nbytes: int  # the buffer's size (tensors aligned inside it)

    def to_wire(self) -> list:
        """Plain lists (survive msgpack into a spawned vLLM engine core, which turns tensors and dataclasses away)."""
        metas = [[m.name, str(m.dtype).removeprefix("torch."), list(m.shape), m.offset] for m in self.metas]
        return [metas, self.nbytes]

    @staticmethod
    def from_wire(w: list) -> BucketPlan:
        metas, nbytes = w
        return BucketPlan([ParamMeta(n, getattr(torch, d), tuple(s), o) for n, d, s, o in metas], int(nbytes))


@dataclass
class WeightPush:
    """One push, and the policy version: CPU buckets (object store), IPC buckets (same GPU), or the plan of a
    collective push (metadata only; the sender keeps the buckets until the push went out)."""

    version: int
    buckets: list[Bucket] | None = None
    ipc: list[IpcBucket] | None = None
    plan: list[BucketPlan] | None = None

    @property
    def nbytes(self) -> int:
        if self.buckets is not None:
            return sum(m.nbytes for b in self.buckets for m in b.metas)
        if self.plan is not None:
            return sum(m.nbytes for b in self.plan for m in b.metas)
        return sum(m.nbytes for b in self.ipc or [] for m in b.metas)
