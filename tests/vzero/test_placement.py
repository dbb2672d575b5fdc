"""Where actors go (vzero/placement.py) and what the config allows, checked before anything is spawned.

CPU CI cannot run a tensor-parallel engine or NCCL, so the placement and config logic is tested here: the bundle
table (learner ranks, TP engines holding tp GPUs on one node, custom resources), the up-front layout check with
its messages (the authors' layout, a 4-GPU-FSDP student + a TP-2 teacher, fits 2 x 4 GPUs and not 8 x 1), the
config's refusals, and on a real local Ray cluster: a layout the nodes cannot hold fails before any actor starts,
and a TP engine's placement group that cannot be placed fails with a bounded wait and leaves nothing behind.
"""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from vzero.config import ActorResources, ConfigError, VLLMOptions, load_config
from vzero.placement import bundles, check_layout, engine_strategy

PAPER_LAYOUT = (  # a 4B-class student with FSDP on 4 GPUs, a 27B-class teacher at TP 2 (the 8-GPU config)
    "learner.world_size=4",
    "teacher.vllm.tensor_parallel_size=2",
    "teacher.resources.num_gpus=2",
)


def _cfg(*overrides: str):
    return load_config(REPO / "configs/qwen2_5-vl-3b-32b-8gpu.yaml", list(overrides))


def _node(cpu: float, gpu: float, **custom: float) -> dict[str, float]:
    return {"CPU": cpu, "GPU": gpu, **custom}


def test_bundles_hold_every_learner_rank_and_a_tp_engines_gpus_in_one_bundle() -> None:
    cfg = _cfg(*PAPER_LAYOUT)
    by_role = {b.role: b.resources for b in bundles(cfg)}
    assert [r for r in by_role if r.startswith("learner")] == [f"learner-rank-{r}" for r in range(4)]
    assert by_role["gating-0"] == {"CPU": 8.0, "GPU": 2.0, "vzero_rollout": 1.0}
    assert by_role["sampler-1"] == {"CPU": 4.0, "GPU": 1.0, "vzero_rollout": 1.0}
    assert by_role["learner-rank-3"] == {"CPU": 8.0, "GPU": 1.0, "vzero_learner": 1.0}
    one = load_config(REPO / "configs/tiny-cpu.yaml")
    assert [b.role for b in bundles(one)] == ["sampler-0", "sampler-1", "gating-0", "learner"]


def test_the_authors_layout_fits_two_4_gpu_pods_and_is_refused_on_single_gpu_nodes() -> None:
    cfg = _cfg(*PAPER_LAYOUT)
    pods = [_node(40, 4, vzero_learner=4), _node(24, 4, vzero_rollout=3)]
    check_layout(cfg, pods)
    with pytest.raises(RuntimeError) as err:  # 8 GPUs in total, but never 2 on one node for the teacher
        check_layout(cfg, [_node(16, 1, vzero_learner=1, vzero_rollout=1)] * 8)
    msg = str(err.value)
    assert "gating-0 needs CPU 8, GPU 2, vzero_rollout 1 on one node" in msg
    assert "tensor-parallel engine needs all its tp GPUs on one node" in msg
    with pytest.raises(RuntimeError, match=r"learner-rank-\d needs CPU 8, GPU 1, vzero_learner 1"):
        check_layout(cfg, [_node(40, 4, vzero_learner=3), _node(24, 4, vzero_rollout=3)])  # a rank short


def test_config_refuses_shared_gpus_under_fsdp_and_tp_without_its_gpus() -> None:
    with pytest.raises(ConfigError, match=r"learner.world_size=2 needs whole GPUs per rank"):
        _cfg("learner.world_size=2", "learner.resources.num_gpus=0.5")
    with pytest.raises(ConfigError, match=r"teacher.vllm.tensor_parallel_size=2 needs teacher.resources.num_gpus"):
        _cfg("teacher.resources.num_gpus=1")
    with pytest.raises(ConfigError, match="weight_transport"):
        _cfg("learner.weight_transport=nccl")
    assert _cfg().learner.weight_transport == "collective"


@pytest.mark.ray
def test_layout_the_nodes_cannot_hold_fails_before_any_actor_starts(ray_local, tiny_model, synth_data, tmp_path):
    from tests.conftest import tiny_config
    from vzero.cluster import check_resources

    # The totals fit (CPUs), but no node advertises the learner group's custom resource.
    cfg = tiny_config(tmp_path, tiny_model, synth_data, "learner.world_size=2", "learner.resources.custom={pod_a: 1}")
    with pytest.raises(RuntimeError, match=r"learner-rank-\d needs CPU 1, pod_a 1 on one node"):
        check_resources(cfg)


@pytest.mark.ray
def test_a_tp_engine_that_cannot_be_placed_fails_with_a_bounded_wait_and_releases_its_group(ray_local) -> None:
    from ray.util import placement_group_table

    assert engine_strategy(ActorResources(num_gpus=1), VLLMOptions(), "tp1") is None  # tp 1: a plain actor
    with pytest.raises(RuntimeError, match=r"vzero-test-tp2 \(tensor_parallel_size=2\): the placement group"):
        engine_strategy(
            ActorResources(num_cpus=1, num_gpus=2), VLLMOptions(tensor_parallel_size=2), "vzero-test-tp2", timeout_s=3
        )
    groups = [g for g in placement_group_table().values() if g["name"] == "vzero-test-tp2"]
    assert groups and all(g["state"] == "REMOVED" for g in groups)
