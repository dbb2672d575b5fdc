"""How the learner turns a mini-batch's trajectories into forwards: the route, the micro-batches, the batches.

`learner.shared_prefix` (the default) computes each prompt group's image and question once per micro-batch
(vzero/shared_prefix.py, route = the family's preferred exact one); otherwise, or where no exact route exists (Qwen3.5
under gradient checkpointing: checkpointed layers drop the key/value cache its only route needs), each trajectory is
one full sequence (`vzero.vlm_inputs.collate`, the authors'). Both give the same log-probs and gradients (float
summation order aside: tests/learner/test_shared_prefix_learner.py).

Micro-batches are consecutive runs of at most `micro_batch_size` trajectories whose forward computes at most
`max_tokens_per_micro_batch` positions, counted the way the route computes them (`computed_positions`: padding and
image tokens included, each shared prefix once), which is what activation memory scales with. A group is a uid: the
trajectories of one prompt share its prompt ids and its image. Pure functions of the trajectories and encoded
images; knows nothing about losses, optimizers or Ray.
"""

from __future__ import annotations

import torch

from vzero.batching import split_mini_batches
from vzero.config import LearnerConfig
from vzero.records import Trajectory
from vzero.shared_prefix import Route, SharedBatch, collate_shared, computed_positions, shared_prefix_routes
from vzero.vlm_inputs import EncodedImage, SequenceBatch, collate


def learner_route(model: torch.nn.Module, cfg: LearnerConfig) -> Route | None:
    """The shared-prefix route the learner's forwards take, None = unshared: off by config, or no exact route for
    this family under this config (gradient checkpointing rules out ``cache``)."""
    if not cfg.shared_prefix:
        return None
    routes = [r for r in shared_prefix_routes(model) if r != "cache" or not cfg.gradient_checkpointing]
    return routes[0] if routes else None


def forward_positions(trajs: list[Trajectory], images: dict[str, EncodedImage], route: Route | None) -> int:
    """Positions one forward over `trajs` computes along `route` (the token budget's unit)."""
    groups = {u: i for i, u in enumerate(dict.fromkeys(t.uid for t in trajs))}
    return computed_positions(
        [len(t.prompt_ids) - 1 + images[t.uid].num_pads for t in trajs],
        [t.num_tokens for t in trajs],
        [groups[t.uid] for t in trajs],
        route,
    )


def micro_batches(
    trajs: list[Trajectory], images: dict[str, EncodedImage], cfg: LearnerConfig, route: Route | None
) -> list[list[Trajectory]]:
    """Consecutive runs of at most `micro_batch_size` trajectories and `max_tokens_per_micro_batch` positions; a
    single over-budget trajectory still gets a micro-batch of its own."""
    out: list[list[Trajectory]] = []
    current: list[Trajectory] = []
    cap = cfg.max_tokens_per_micro_batch
    for t in trajs:
        over = cap is not None and forward_positions([*current, t], images, route) > cap
        if current and (len(current) == cfg.micro_batch_size or over):
            out.append(current)
            current = []
        current.append(t)
    if current:
        out.append(current)
    return out


def step_micro_batches(
    trajs: list[Trajectory], images: dict[str, EncodedImage], cfg: LearnerConfig, route: Route | None
) -> list[list[Trajectory]]:
    """The micro-batches a training step on `trajs` runs, mini-batch after mini-batch (one mini-batch if there are
    fewer groups than mini-batches). A forward over the same rows has the same shapes, so the same bits: a shared
    prefix's left padding depends on which groups share a micro-batch, and AdamW magnifies the last bits of
    near-zero gradients (a key bias's) into differences of the learning rate's size."""
    k = cfg.mini_batches_per_step
    minis = split_mini_batches(trajs, k) if len({t.uid for t in trajs}) >= k else [trajs]
    return [m for mini in minis for m in micro_batches(mini, images, cfg, route)]


def collate_trajectories(
    trajs: list[Trajectory], images: dict[str, EncodedImage], route: Route | None, *, pad_id: int, image_pad_id: int
) -> SequenceBatch | SharedBatch:
    """The forward's input: one prefix per group + the responses (shared), or one full sequence per trajectory."""
    rows = [(t.prompt_ids, images[t.uid], t.response_ids) for t in trajs]
    if route is not None:
        return collate_shared(rows, pad_id=pad_id, image_pad_id=image_pad_id)
    return collate(rows, pad_id=pad_id, image_pad_id=image_pad_id)
