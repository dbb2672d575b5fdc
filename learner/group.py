"""The learner the driver holds when `learner.world_size` > 1: N sharded ranks behind today's learner methods.

Like RLlib's LearnerGroup, the driver keeps calling `learner.train_step.remote(...)`, `state_for_push.remote(...)`,
`save.remote(...)` and gets ONE ObjectRef back, as from a single learner actor (world_size 1 spawns that actor and
none of this runs). Here:
- one placement group with a bundle per rank (vzero/placement.py); a zero-CPU task on rank 0's bundle picks the
  rendezvous address (its node's IP and a free port), then the N `Learner` ranks start together and meet there
  (torch.distributed, learner/fsdp.py). Ranks never restart (`max_restarts` 0): a new rank cannot join the old
  process group; the driver's "learner restarted" check then asks for `--resume`.
- calls every rank must make (the train step and its collectives, the full-weight gather, checkpoints) go to all
  ranks with the same arguments; the ref returned resolves to rank 0's answer once EVERY rank finished, and the
  first rank error is raised at once (no rank keeps the others waiting in a collective unnoticed);
- `state_for_push` returns rank 0's ref directly (rank 0 holds the push; the others return None), so an object-store
  push is not copied again; calls of the collective transport's sender (`open_weight_group`, `join_weight_group`,
  `send_weights`) and `device_uuid` / `policy_version` go to rank 0 only.
"""

from __future__ import annotations

from typing import Any

import ray

from learner.learner import Learner
from vzero import placement
from vzero.cluster import spawn
from vzero.config import TrainConfig

EVERY_RANK = ("train_step", "logprobs", "save", "load", "ready", "release_push")
GATHER = ("state_for_push",)
RANK0 = ("device_uuid", "policy_version", "open_weight_group", "join_weight_group", "send_weights")


@ray.remote(num_cpus=0)
def _rendezvous() -> tuple[str, int]:
    from vzero.weight_group import free_port, node_address

    host = node_address()
    return host, free_port(host)


@ray.remote(num_cpus=0, max_retries=0)
def _rank0_when_all_done(refs: list[Any]) -> Any:
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready[0])  # a rank's error surfaces now, not after the others time out in a collective
    return ray.get(refs[0])


class _Method:
    def __init__(self, group: LearnerGroup, name: str):
        self.group, self.name = group, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        ranks = self.group.ranks
        if self.name in RANK0:
            return getattr(ranks[0], self.name).remote(*args, **kwargs)
        refs = [getattr(r, self.name).remote(*args, **kwargs) for r in ranks]
        if self.name in GATHER:
            return refs[0]
        return _rank0_when_all_done.remote(refs)


class LearnerGroup:
    def __init__(self, cfg: TrainConfig, name: str):
        n = cfg.learner.world_size
        self.pg = placement.learner_group(cfg, name)
        master = ray.get(_rendezvous.options(scheduling_strategy=placement.rank_strategy(self.pg, 0)).remote())
        res = cfg.learner.resources.model_copy(update={"max_restarts": 0})
        self.ranks = [
            spawn(Learner, res, f"{name}-rank{r}", cfg, r, n, master, placement=placement.rank_strategy(self.pg, r))
            for r in range(n)
        ]
        for method in (*EVERY_RANK, *GATHER, *RANK0):
            setattr(self, method, _Method(self, method))

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r, no_restart=True)
        ray.util.remove_placement_group(self.pg)
