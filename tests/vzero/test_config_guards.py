"""Config guards of the training loop: combinations that would silently break an invariant are refused up front.

Each case names the field(s) in the one-line-per-problem message, before any actor starts: seeds outside what
numpy / vLLM accept; sync mode (strictly on-policy) with pushes every k > 1 steps; async mode whose staleness bound
cannot hold with that push cadence; nucleus sampling (the learner cannot reproduce its distribution); a teacher top-k
larger than a vLLM teacher returns.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vzero.config import ConfigError, load_config

TINY = Path(__file__).resolve().parents[2] / "configs/tiny-cpu.yaml"
MAX_SEED = 2**31 - 1  # non-negative and 31 bits: what numpy (np.random.seed) and vLLM engines (seed + rank) take


@pytest.mark.parametrize("field", ["seed", "views.seed", "data.synth.seed", "student.build.seed"])
@pytest.mark.parametrize("value", [-1, MAX_SEED + 1])
def test_seeds_out_of_range_are_refused_naming_the_field(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"\n  {field}: Input should be (greater|less) than or equal to"):
        load_config(TINY, [f"{field}={value}"])
    assert load_config(TINY, [f"{field}={MAX_SEED}"])  # the largest allowed seed is fine


def test_sync_mode_refuses_pushing_less_often_than_every_step() -> None:
    with pytest.raises(ConfigError, match=r"mode=sync is strictly on-policy, but learner.weight_push_every=2"):
        load_config(TINY, ["mode=sync", "learner.weight_push_every=2"])


def test_async_staleness_bound_must_cover_the_push_cadence() -> None:
    with pytest.raises(ConfigError, match=r"mode=async with learner.weight_push_every=3 needs max_staleness >= 3"):
        load_config(TINY, ["mode=async", "max_staleness=1", "learner.weight_push_every=3"])
    assert load_config(TINY, ["mode=async", "max_staleness=3", "learner.weight_push_every=3"])


def test_nucleus_sampling_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"rollout.top_p=0.9 is refused: the learner does not apply the nucleus"):
        load_config(TINY, ["rollout.top_p=0.9"])
    assert load_config(TINY, ["rollout.temperature=0.7"]).rollout.temperature == 0.7


def test_teacher_topk_must_fit_the_vllm_teachers_max_logprobs() -> None:
    overrides = ["loss.mode=forward_kl_topk", "loss.teacher_topk=100", "teacher.vllm.max_logprobs=64"]
    with pytest.raises(ConfigError, match=r"loss.teacher_topk \(100\) must be <= teacher.vllm.max_logprobs \(64\)"):
        load_config(TINY, overrides)
    assert load_config(TINY, [*overrides, "teacher.engine=transformers"])  # no such limit there
    assert load_config(TINY, [*overrides, "teacher.vllm.max_logprobs=100"])
