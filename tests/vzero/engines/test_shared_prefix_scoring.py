"""The transformers engine's shared-prefix scoring: same results as per-request scoring, chosen by config.

Invariants: scoring requests that share a prompt and image against one prefix forward returns the per-request
log-probs and top-k (≤ 1e-4, float32) in request order, whatever the grouping and chunking; `teacher.scoring=auto`
picks it for pure-attention teachers unless vLLM is asked for explicitly; shared_prefix with engine=vllm is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import needs_vllm
from vzero.config import ConfigError, load_config
from vzero.engines import ScoreRequest, resolve_teacher_scoring
from vzero.vlm_inputs import chat_prompt_ids

PIX = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}


def _image(seed: int, size) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def test_shared_prefix_scoring_equals_per_request_scoring(tiny_model) -> None:
    from vzero.engines.hf import HFEngine

    per = HFEngine(str(tiny_model), batch_size=4, **PIX)
    shared = HFEngine(str(tiny_model), batch_size=4, scoring="shared_prefix", **PIX)
    assert shared.shared_prefix and not per.shared_prefix
    tok = per.tokenizer
    images = [_image(i, (100 + 30 * i, 120)) for i in range(3)]
    prompts = [chat_prompt_ids(tok, q) for q in ("Which shape is red?", "Count the dots, please.")]
    rng = np.random.RandomState(0)
    reqs = []
    # interleaved groups of 2, 3 and 5 requests (the last one is cut into chunks of 4), one with top-k
    for j in range(5):
        for g, (p, im) in enumerate([(prompts[0], images[0]), (prompts[1], images[1]), (prompts[0], images[2])]):
            if j < (2, 3, 5)[g]:
                resp = rng.randint(0, 400, size=int(rng.randint(1, 8))).tolist()
                reqs.append(ScoreRequest(p, im, resp, topk=3 if (g, j) == (1, 0) else 0))
    a, b = per.score(reqs), shared.score(reqs)
    assert len(b) == len(reqs)
    for r, x, y in zip(reqs, a, b, strict=True):
        assert len(y.logprobs) == len(r.response_ids)
        np.testing.assert_allclose(y.logprobs, x.logprobs, atol=1e-4)
        assert (y.topk_ids is None) == (r.topk == 0)
        if r.topk:
            assert y.topk_ids == x.topk_ids
            np.testing.assert_allclose(y.topk_logprobs, x.topk_logprobs, atol=1e-4)


def test_auto_scoring_shares_prefixes_of_attention_teachers_unless_vllm_is_asked_for(tiny_model) -> None:
    assert resolve_teacher_scoring("auto", "auto", str(tiny_model)) == ("transformers", "shared_prefix")
    assert resolve_teacher_scoring("auto", "transformers", str(tiny_model)) == ("transformers", "shared_prefix")
    assert resolve_teacher_scoring("shared_prefix", "auto", str(tiny_model)) == ("transformers", "shared_prefix")
    assert resolve_teacher_scoring("per_request", "transformers", str(tiny_model)) == ("transformers", "per_request")


@needs_vllm
def test_explicit_vllm_teacher_keeps_per_request_prompt_logprobs(tiny_model) -> None:
    assert resolve_teacher_scoring("auto", "vllm", str(tiny_model)) == ("vllm", "per_request")
    assert resolve_teacher_scoring("per_request", "auto", str(tiny_model)) == ("vllm", "per_request")


def test_shared_prefix_scoring_with_a_vllm_engine_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"teacher\.scoring=shared_prefix runs on the transformers engine"):
        load_config(None, ["teacher.scoring=shared_prefix", "teacher.engine=vllm"])
