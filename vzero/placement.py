"""Where a job's actors go: the bundles each role needs, their up-front check against the cluster, placement groups.

One table (`bundles(cfg)`) says what every actor asks Ray for; the resource totals (`vzero.cluster.
requested_resources`), the up-front layout check (`check_layout`) and the KubeRay manifest tests all read it:
- a sampler / gating actor: one bundle of its `resources` (CPU, GPU, custom); with `vllm.tensor_parallel_size`
  = tp > 1 the bundle holds tp GPUs on ONE node: the engine runs its tp workers as processes of that actor
  (`distributed_executor_backend="mp"`, set explicitly because vLLM picks "ray" inside a placement group), each
  worker joins the weight group at rank offset 1 + its TP rank (actors/collective_receiver.py);
- the learner: `learner.world_size` bundles of `learner.resources` (one per rank, spread over nodes if needed).
`check_layout` packs every bundle into the alive nodes (first fit, largest first) before anything is spawned, and
fails with a message naming the role that does not fit and what each node has left. Placement groups
(`learner_group`, `engine_strategy`) are created with a bounded wait and name the role when they cannot be placed.

Imports Ray lazily (the table and the check are pure: the config and deploy tests use them without a cluster).
"""

from __future__ import annotations

from dataclasses import dataclass

from vzero.config import ActorResources, TrainConfig, VLLMOptions

PLACEMENT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Bundle:
    role: str  # "sampler-0", "learner-rank-1", ...
    resources: dict[str, float]  # Ray resource name -> amount, all on one node
    group: str  # bundles of one group come from one placement group ("" = a plain actor)


def actor_bundle(res: ActorResources, vllm: VLLMOptions | None = None) -> dict[str, float]:
    """What one actor asks Ray for; a TP engine takes its tp GPUs in the same bundle (one node)."""
    gpus = res.num_gpus
    if vllm is not None and vllm.tensor_parallel_size > 1:
        gpus = max(gpus, float(vllm.tensor_parallel_size))
    out = {"CPU": res.num_cpus, "GPU": gpus, **res.custom}
    return {k: float(v) for k, v in out.items() if v}


def bundles(cfg: TrainConfig) -> list[Bundle]:
    """Every bundle the job's actors need, in spawn order."""
    out = [
        Bundle(f"sampler-{i}", actor_bundle(cfg.rollout.resources, cfg.rollout.vllm), "")
        for i in range(cfg.rollout.num_samplers)
    ]
    out += [
        Bundle(f"gating-{i}", actor_bundle(cfg.teacher.resources, cfg.teacher.vllm), "")
        for i in range(cfg.teacher.num_actors)
    ]
    n = cfg.learner.world_size
    out += [
        Bundle("learner" if n == 1 else f"learner-rank-{r}", actor_bundle(cfg.learner.resources), "learner")
        for r in range(n)
    ]
    return out


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(res.items())) or "nothing"


def check_layout(cfg: TrainConfig, nodes: list[dict[str, float]]) -> None:
    """Fail unless every bundle fits some node (first fit, largest first); nodes = each alive node's resources."""
    free = [dict(n) for n in nodes]
    order = sorted(bundles(cfg), key=lambda b: (-b.resources.get("GPU", 0.0), -b.resources.get("CPU", 0.0)))
    for b in order:
        node = next((n for n in free if all(n.get(k, 0.0) >= v - 1e-9 for k, v in b.resources.items())), None)
        if node is None:
            shown = ("CPU", "GPU", *b.resources)
            left = (
                "; ".join(f"node {i}: {_fmt({k: v for k, v in n.items() if k in shown})}" for i, n in enumerate(free))
                or "no alive nodes"
            )
            hint = ""
            if b.resources.get("GPU", 0) > 1 and not b.role.startswith("learner"):
                hint = (
                    " A tensor-parallel engine needs all its tp GPUs on one node (one bundle); lower "
                    "vllm.tensor_parallel_size or use nodes with more GPUs."
                )
            raise RuntimeError(
                f"the cluster cannot hold this job's layout: {b.role} needs {_fmt(b.resources)} on one node, "
                f"and after placing the larger actors the nodes have left: {left}.{hint} Lower "
                "rollout.num_samplers / teacher.num_actors / learner.world_size or the per-actor resources, or add "
                "nodes (ray.num_cpus / ray.num_gpus for a local cluster)."
            )
        for k, v in b.resources.items():
            node[k] = node.get(k, 0.0) - v


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _ready(pg, what: str, timeout_s: float) -> None:
    import ray

    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(
            f"{what}: the placement group {pg.bundle_specs} was not placed within {timeout_s:g}s (the "
            "cluster has the resources in total but not on the nodes this layout needs, or other jobs hold them)"
        ) from None


def learner_group(cfg: TrainConfig, name: str, *, timeout_s: float = PLACEMENT_TIMEOUT_S):
    """One placement group with a bundle per learner rank (PACK: on as few nodes as the GPUs allow)."""
    from ray.util.placement_group import placement_group

    b = actor_bundle(cfg.learner.resources)
    pg = placement_group([dict(b) for _ in range(cfg.learner.world_size)], strategy="PACK", name=name)
    _ready(pg, f"learner group ({cfg.learner.world_size} ranks of {_fmt(b)})", timeout_s)
    return pg


def engine_strategy(res: ActorResources, vllm: VLLMOptions, name: str, *, timeout_s: float = PLACEMENT_TIMEOUT_S):
    """Scheduling for a vLLM engine actor: None (a plain actor) at tp 1; at tp > 1 a placement group with one bundle
    holding the engine's tp GPUs on one node, its child processes captured."""
    if vllm.tensor_parallel_size == 1:
        return None
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([actor_bundle(res, vllm)], strategy="STRICT_PACK", name=name)
    _ready(pg, f"{name} (tensor_parallel_size={vllm.tensor_parallel_size})", timeout_s)
    return PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
    )


def rank_strategy(pg, rank: int):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
