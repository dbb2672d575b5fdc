"""Seeded vLLM sampling on CPU at a size where one engine step cannot hold every prompt.

Invariant: a batch whose prompt tokens exceed vLLM's per-step token budget still samples, reproducibly (same requests
and seed, same samples) and with the n samples of each request distinct. Under vLLM's CPU defaults (chunked prefill,
4096 tokens per step) such a batch splits a seeded prompt across steps and vLLM's generator rewind crashes on CPU
("CPU Generator does not use offset"); the engine schedules prefills whole on CPU instead.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import needs_vllm
from vzero.config import VLLMOptions
from vzero.engines import GenerateRequest, SamplingSpec
from vzero.vlm_inputs import chat_prompt_ids

pytestmark = [needs_vllm, pytest.mark.vllm]

PIX = {"min_pixels": 56 * 56, "max_pixels": 224 * 224}  # 64 image tokens per prompt: ~90-token prompts


@pytest.fixture(scope="module")
def engine(tiny_model):
    from vzero.engines.vllm import VLLMEngine

    return VLLMEngine(str(tiny_model), device="cpu", options=VLLMOptions(max_model_len=1024), **PIX)


def _requests(engine, k: int) -> list[GenerateRequest]:
    rng = np.random.RandomState(0)
    ids = chat_prompt_ids(engine.tokenizer, "Which shape is in the top left corner?")
    return [GenerateRequest(ids, Image.fromarray((rng.rand(224, 224, 3) * 255).astype("uint8"))) for _ in range(k)]


def test_seeded_batch_larger_than_one_engine_step_is_reproducible_and_distinct(engine) -> None:
    n = 8
    reqs = _requests(engine, 8)
    spec = SamplingSpec(n=n, temperature=1.0, top_p=1.0, max_tokens=8, seed=11)
    first = engine.generate(reqs, spec)

    # The batch really is bigger than one step: n children per request, each prefilling the expanded prompt.
    probe = engine.llm.generate(
        [{"prompt_token_ids": reqs[0].prompt_ids, "multi_modal_data": {"image": reqs[0].image}}], use_tqdm=False
    )
    prompt_tokens = n * len(reqs) * len(probe[0].prompt_token_ids)
    step_budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    assert prompt_tokens > step_budget, (prompt_tokens, step_budget)

    assert engine.generate(reqs, spec) == first, "same requests and seed, same samples"
    for group in first:
        assert len(group) == n
        assert len({tuple(s.response_ids) for s in group}) == n, "the n samples of a request are distinct"
    other = engine.generate(reqs, SamplingSpec(n=n, temperature=1.0, top_p=1.0, max_tokens=8, seed=12))
    assert other != first, "another seed, other samples"
