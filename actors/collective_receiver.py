"""The receiving end of the `collective` weight transport inside a vLLM worker (a `worker_extension_cls`).

Extends `actors.weight_receiver.WeightReceiverExtension` (object-store / CUDA-IPC pushes) with two methods the
engine calls on EVERY worker through `collective_rpc` (vzero/engines/vllm.py), so a tensor-parallel engine joins the
weight group with all its workers, worker w at rank `rank_offset + w` (vLLM's `self.rank` is the TP rank), and each
worker receives the full tensors and shards them itself in `load_weights`:
- `vzero_join_weight_group(spec, rank_offset)`: rendezvous with learner rank 0 (blocks until every rank arrived);
- `vzero_receive_weights(plan, version, load)`: receive one push bucket by bucket (vzero/weight_group.py).
  CPU workers stream EVERY bucket of the push into ONE `reload_weights(weights_iterator=...)`: one layerwise-reload
  session per bucket splits fused q/k/v and gate/up across sessions and gives NaN logits (measured). GPU workers
  `load_weights` straight into the parameters as the buckets arrive. `load=False` drains a push without loading
  it (a version the sampler already has: every rank must still take part in the broadcast).
Arguments are plain lists/dicts (`GroupSpec.to_wire`, `BucketPlan.to_wire`): a spawned engine core passes them
through msgpack. The engine resets the prefix and encoder caches after a push.
"""

from __future__ import annotations

import logging

import torch

from actors.weight_receiver import WeightReceiverExtension
from vzero.weight_group import GroupSpec, WeightGroup, receive_buckets
from vzero.weights import BucketPlan


class CollectiveReceiverExtension(WeightReceiverExtension):
    def vzero_join_weight_group(self, spec: dict, rank_offset: int) -> int:
        old = getattr(self, "_vzero_group", None)
        if old is not None:
            old.close()
        self._vzero_group = None
        group = WeightGroup(GroupSpec.from_wire(spec), rank_offset + self.rank, self._vzero_device())
        self._vzero_group = group
        return group.rank

    def vzero_receive_weights(self, plan: list, version: int, load: bool = True) -> int:
        group = getattr(self, "_vzero_group", None)
        if group is None:
            raise RuntimeError("this vLLM worker is in no weight group (restarted?): the driver must rebuild it")
        weights = receive_buckets(group, [BucketPlan.from_wire(b) for b in plan], version)
        n = 0

        def counted():
            nonlocal n
            for item in weights:
                n += 1
                yield item

        if not load:
            for _ in counted():
                pass
            return 0
        if group.device.type == "cpu":
            # Layers without weights (norm fusions, rotary tables) log "Failed to load weights" on every reload.
            logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
            self.reload_weights(weights_iterator=counted())
        else:  # bucket by bucket as they arrive, straight into the parameters
            self.model_runner.model.load_weights(weights=counted())
            torch.cuda.synchronize()
        return n

    def _vzero_device(self) -> torch.device:
        device = getattr(self.model_runner, "device", None)
        return torch.device(device) if device is not None else torch.device("cpu")
