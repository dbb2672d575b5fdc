"""The sending end of the `collective` weight transport, held by learner rank 0.

One weight group per sampler (vzero/weight_group.py: rank 0 = this learner, ranks 1..tp = the sampler engine's
workers). A push is made once (`make_push`: the learner's weights, gathered and cast to the samplers' dtype, packed
into buckets on the learner's device) and only its plan (names, dtypes, shapes, offsets) goes back through Ray; the
buckets stay here until `send` broadcasts them into the groups of the samplers the driver names, and until the
driver says no push of that version can be sent again (`release(keep)`, the rule CUDA IPC buckets follow: a
restarted sampler in async mode is brought back to its batch's version, which may be one behind).

Protocol, as the driver runs it (vzero/pushes.py): `open_group(key, world)` returns a fresh `GroupSpec` (new port);
the driver starts the sampler's join and `join_group(key)` here together (each blocks until every rank arrived);
for a push it first starts the samplers' receive calls, then `send(version, keys)`. A group whose broadcast fails
(peer died, timed out) is closed and reported; the driver rebuilds it before the next push to that sampler.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection

import torch

from vzero.weight_group import GroupSpec, WeightGroup, free_port, node_address, send_buckets
from vzero.weights import DEFAULT_BUCKET_BYTES, Bucket, BucketPlan, WeightPush, pack_buckets


class CollectiveSender:
    def __init__(
        self,
        device: torch.device,
        *,
        timeout_s: float,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ):
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.timeout_s = timeout_s
        self.bucket_bytes = bucket_bytes
        self.groups: dict[str, WeightGroup] = {}
        self._pending: dict[str, GroupSpec] = {}
        self._buckets: dict[int, list[Bucket]] = {}

    # -- pushes -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def make_push(self, named: list[tuple[str, torch.Tensor]], version: int) -> WeightPush:
        self._buckets[version] = pack_buckets(named, bucket_bytes=self.bucket_bytes, device=self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # packed before any communicator stream reads the buffers
        return WeightPush(version, plan=[BucketPlan(b.metas, b.nbytes) for b in self._buckets[version]])

    def release(self, keep: Collection[int] = ()) -> None:
        """Free the buckets of every version not in `keep` (the driver will never send those pushes again)."""
        self._buckets = {v: b for v, b in self._buckets.items() if v in keep}

    def send(self, version: int, keys: list[str]) -> dict[str, str]:
        """Broadcast version `version` into the groups `keys`; returns {key: error} for groups that failed."""
        if version not in self._buckets:
            raise RuntimeError(
                f"collective push of policy version {version}: the learner keeps only versions "
                f"{sorted(self._buckets)} (older pushes were dropped)"
            )
        missing = [k for k in keys if k not in self.groups]
        if missing:
            raise RuntimeError(f"collective push: no weight group for {missing} (open and join one first)")
        failed = send_buckets({k: self.groups[k] for k in keys}, self._buckets[version], version)
        for key in failed:
            self.groups.pop(key).close()
        return {k: f"{type(e).__name__}: {e}" for k, e in failed.items()}

    # -- groups ---------------------------------------------------------------------------------------------------
    def open_group(self, key: str, world_size: int) -> GroupSpec:
        """A fresh rendezvous point for `key` (an old group of that key is closed: its peer is gone)."""
        self.close_group(key)
        host = node_address()
        spec = GroupSpec(host, free_port(host), world_size, self.backend, self.timeout_s, uuid.uuid4().hex)
        self._pending[key] = spec
        return spec

    def join_group(self, key: str) -> str:
        """Rank 0's side of the rendezvous; blocks until the sampler's workers joined too. Returns the group id."""
        spec = self._pending.pop(key)
        self.groups[key] = WeightGroup(spec, 0, self.device)
        return spec.group_id

    def close_group(self, key: str) -> None:
        self._pending.pop(key, None)
        group = self.groups.pop(key, None)
        if group is not None:
            group.close()
