"""Shared-prefix scoring on both engines: the per-request results, each (prompt, images) prefix computed once.

Invariants: scoring requests that share a prompt and images against one prefix computation returns the per-request
log-probs and top-k in request order, whatever the grouping and chunking: transformers ≤ 1e-4 (float32; measured
~5e-7), vLLM bit-exact (the prefix cache holds the same keys/values; hits that reach into a response:
tests/vzero/engines/test_vllm_cpu_scheduling.py); `auto` picks shared-prefix scoring where the engine supports it.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import needs_vllm
from vzero.config import VLLMOptions, load_config
from vzero.engines import ScoreRequest
from vzero.vlm_inputs import chat_prompt_ids

PIX = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}


def _image(seed: int, size) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def _requests(tok, *, side: int = 100) -> list[ScoreRequest]:
    """Interleaved groups of 2, 3 and 5 requests (two share a prompt), one with top-k."""
    images = [_image(i, (side + 30 * i, side)) for i in range(3)]
    prompts = [chat_prompt_ids(tok, q) for q in ("Which shape is red?", "Count the dots, please.")]
    rng = np.random.RandomState(0)
    reqs = []
    for j in range(5):
        for g, (p, im) in enumerate([(prompts[0], images[0]), (prompts[1], images[1]), (prompts[0], images[2])]):
            if j < (2, 3, 5)[g]:
                resp = rng.randint(0, 400, size=int(rng.randint(1, 8))).tolist()
                reqs.append(ScoreRequest(p, im, resp, topk=3 if (g, j) == (1, 0) else 0))
    return reqs


def _assert_same(reqs, a, b, atol: float) -> None:
    assert len(b) == len(reqs)
    for r, x, y in zip(reqs, a, b, strict=True):
        assert len(y.logprobs) == len(r.response_ids)
        np.testing.assert_allclose(y.logprobs, x.logprobs, atol=atol, rtol=0)
        assert (y.topk_ids is None) == (r.topk == 0)
        if r.topk:
            assert y.topk_ids == x.topk_ids
            np.testing.assert_allclose(y.topk_logprobs, x.topk_logprobs, atol=atol, rtol=0)


def test_transformers_shared_prefix_scoring_equals_per_request_scoring(tiny_model) -> None:
    from vzero.engines.hf import HFEngine

    per = HFEngine(str(tiny_model), batch_size=4, **PIX)
    shared = HFEngine(str(tiny_model), batch_size=4, scoring="auto", **PIX)  # the last group is cut into 4 + 1
    assert (per.scoring, shared.scoring) == ("per_request", "shared_prefix")
    reqs = _requests(per.tokenizer)
    _assert_same(reqs, per.score(reqs), shared.score(reqs), atol=1e-4)


@needs_vllm
@pytest.mark.vllm
def test_vllm_shared_prefix_scoring_equals_per_request_scoring(tiny_model) -> None:
    from vzero.engines.vllm import VLLMEngine

    pix = {**PIX, "max_pixels": 336 * 336}  # ~150 image tokens: every prefix spans several cache blocks
    engine = VLLMEngine(str(tiny_model), device="cpu", options=VLLMOptions(max_model_len=1024), scoring="auto", **pix)
    assert engine.scoring == "shared_prefix"
    reqs = _requests(engine.tokenizer, side=336)
    shared = engine.score(reqs)
    assert engine.score_stats["cached_tokens"] >= 128 * (len(reqs) - 3), "all but one replay per group read it"
    engine.reset_caches()
    engine.scoring = "per_request"
    _assert_same(reqs, engine.score(reqs), shared, atol=0.0)


def test_teacher_scoring_defaults_to_auto() -> None:
    assert load_config(None, []).teacher.scoring == "auto"
