"""configs/vzero-paper-qwen3_5.yaml: it loads, and it holds the authors' launcher values (their
`scripts/run_vzero_qwen35_vl_fsdp.sh` and the verl defaults it relies on; shared/notes/vzero-method.md, "The authors'
recipe, point by point")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vzero.config import TrainConfig, load_config

PAPER = Path(__file__).resolve().parents[2] / "configs" / "vzero-paper-qwen3_5.yaml"
AUTHORS: dict[str, Any] = {  # dotted field -> the authors' value
    "student.path": "/data/models/Qwen3.5-4B",
    "teacher.model.path": "/data/models/Qwen3.5-27B",
    "teacher.vllm.tensor_parallel_size": 2,
    "teacher.vllm.max_model_len": 32768,
    "teacher.context": "full_and_crop",
    "rollout.n": 8,
    "rollout.prompts_per_step": 32,
    "rollout.temperature": 1.0,
    "rollout.top_p": 1.0,
    "rollout.max_tokens": 2048,
    "rollout.vllm.max_model_len": 25000 + 2048 + 1,
    "learner.lr": 1e-6,
    "learner.mini_batches_per_step": 2,
    "learner.weight_decay": 0.01,
    "learner.grad_clip": 1.0,
    "learner.gradient_checkpointing": True,
    "learner.freeze_vision": False,
    "learner.max_tokens_per_micro_batch": 24576,
    "loss.mode": "k1_pg",
    "loss.clip_low": 0.2,
    "loss.clip_high": 0.2,
    "loss.dual_clip_c": None,
    "loss.kl_clamp": 10.0,
    "loss.logprob_min": -10.0,
    "loss.floor_sampled_logprobs": False,
    "loss.topk_renormalize": False,
    "loss.old_logprobs": "recompute",
    "gate.enabled": True,
    "gate.level": "sequence",
    "gate.gamma": 1.0,
    "gate.alpha": 0.5,
    "gate.w_min": 0.0,
    "gate.w_max": 2.0,
    "views.negative_mode": "hard_negative_crop",
    "views.downsample_factor": 2.0,
    "checkpoint.every": 10,
    "learner.world_size": 4,  # theirs: FSDP over NGPUS_PER_NODE=4
    "mode": "sync",
}
for model in ("student", "teacher.model"):
    AUTHORS |= {f"{model}.min_pixels": 65536, f"{model}.max_pixels": 16777216}
    AUTHORS |= {f"{model}.chat.system_prompt": None, f"{model}.chat.enable_thinking": False}


def _get(cfg: TrainConfig, dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        node = getattr(node, key)
    return node


@pytest.fixture(scope="module")
def paper() -> TrainConfig:
    return load_config(PAPER)


@pytest.mark.parametrize("field", sorted(AUTHORS))
def test_paper_config_holds_the_authors_value(paper, field) -> None:
    assert _get(paper, field) == AUTHORS[field]


def test_paper_teacher_takes_the_full_image_and_a_crop_per_prompt(paper) -> None:
    assert paper.teacher.vllm.max_images_per_prompt >= 2
    assert paper.rollout.vllm.max_images_per_prompt == 1  # the student sees the full image only
