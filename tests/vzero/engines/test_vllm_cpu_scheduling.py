"""The vLLM engine's CPU scheduling: batches larger than one engine step, and replays that share their prompt.

Invariants: a seeded batch whose prompt tokens exceed vLLM's per-step token budget samples reproducibly (same
requests and seed, same samples) with the n samples of each request distinct (under vLLM's CPU defaults such a batch
split a seeded prompt across steps and crashed: "CPU Generator does not use offset"); teacher replays that share
their prompt, and even their response, with other replays in the batch score exactly as each replayed alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import needs_vllm
from vzero.config import VLLMOptions
from vzero.engines import GenerateRequest, SamplingSpec, ScoreRequest
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
        [{"prompt_token_ids": reqs[0].prompt_ids, "multi_modal_data": {"image": reqs[0].images[0]}}], use_tqdm=False
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


def test_replays_sharing_prompt_and_response_prefixes_score_as_each_alone(engine) -> None:
    req = _requests(engine, 1)[0]
    rng = np.random.RandomState(1)
    base = rng.randint(10, 500, size=40).tolist()
    responses = [
        base,
        base,  # an exact duplicate: its cache hit reaches into the response
        base[:36] + rng.randint(10, 500, size=4).tolist(),  # shares a block-aligned response prefix
        rng.randint(10, 500, size=12).tolist(),
        rng.randint(10, 500, size=40).tolist(),
    ]
    batch = [ScoreRequest(req.prompt_ids, req.images, r, topk=2) for r in responses]
    engine.reset_caches()
    together = engine.score(batch)

    # The batch really shares: replaying the same prompt again hits the prefix cache (it holds the image tokens).
    probe = engine.llm.generate(
        [{"prompt_token_ids": req.prompt_ids + responses[3], "multi_modal_data": {"image": req.images[0]}}],
        __import__("vllm").SamplingParams(max_tokens=1, detokenize=False),
        use_tqdm=False,
    )
    assert probe[0].num_cached_tokens >= 32

    for r, got in zip(batch, together, strict=True):
        engine.reset_caches()
        (alone,) = engine.score([r])
        np.testing.assert_allclose(got.logprobs, alone.logprobs, atol=1e-5)
        assert got.topk_ids == alone.topk_ids
        np.testing.assert_allclose(got.topk_logprobs, alone.topk_logprobs, atol=1e-5)
