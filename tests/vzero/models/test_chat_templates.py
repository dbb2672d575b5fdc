"""Prompts per family: the chat-template options (`ChatOptions`: system turn, thinking) and multi-image prompts.

Invariants: by default no system turn is sent (the authors' setting; only the Qwen2 templates insert their own
default, exactly as before this option existed) and thinking is off; a configured system prompt appears once; only
Qwen3.5's template reacts to `enable_thinking`; a prompt holds one pad per image in order, and `collate` expands a
two-image prompt exactly like the family's HF processor; families that share a vocabulary can teach each other,
others are refused with a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vzero.config import ChatOptions
from vzero.models.compat import tokenizer_mismatch
from vzero.models.families import FAMILIES, get_family
from vzero.models.presets import ARCHS, get_preset
from vzero.models.tiny import build_processor
from vzero.models.tokenizer import build_tokenizer
from vzero.vlm_inputs import IMAGE_PAD, ImageEncoder, chat_prompt_ids, collate, expand_image_pads

QUESTION = "What color is the small square?"
TWO_IMAGES = [
    {"type": "image"},
    {"type": "text", "text": "The full image, then a zoomed crop:"},
    {"type": "image"},
    {"type": "text", "text": QUESTION},
]


@pytest.fixture(scope="module")
def tokenizers():
    return {arch: build_tokenizer(512, arch=arch) for arch in ARCHS}


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_system_turn_and_no_thinking_by_default(tokenizers, arch: str) -> None:
    tok, family = tokenizers[arch], get_family(arch)
    text = _text(tok, chat_prompt_ids(tok, QUESTION))
    default = family.template_default_system
    if default is None:  # Qwen3-VL / Qwen3.5: the prompt starts with the user turn
        assert text.startswith("<|im_start|>user\n") and "system" not in text
    else:  # Qwen2 templates insert their own default: the same ids as passing it explicitly (today's prompts)
        assert text.startswith(f"<|im_start|>system\n{default}<|im_end|>\n<|im_start|>user\n")
        assert chat_prompt_ids(tok, QUESTION) == chat_prompt_ids(tok, QUESTION, ChatOptions(system_prompt=default))
    tail = "<|im_start|>assistant\n<think>\n\n</think>\n\n" if family.template_thinks else "<|im_start|>assistant\n"
    assert text.endswith(tail)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_configured_system_prompt_is_the_only_system_turn(tokenizers, arch: str) -> None:
    tok = tokenizers[arch]
    text = _text(tok, chat_prompt_ids(tok, QUESTION, ChatOptions(system_prompt="Answer with one word.")))
    assert text.startswith("<|im_start|>system\nAnswer with one word.<|im_end|>\n<|im_start|>user\n")
    assert text.count("<|im_start|>system") == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_only_thinking_templates_react_to_enable_thinking(tokenizers, arch: str) -> None:
    tok = tokenizers[arch]
    off = chat_prompt_ids(tok, QUESTION, ChatOptions(enable_thinking=False))
    on = chat_prompt_ids(tok, QUESTION, ChatOptions(enable_thinking=True))
    if get_family(arch).template_thinks:
        assert _text(tok, on).endswith("<|im_start|>assistant\n<think>\n")
        assert _text(tok, off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        think = tok.convert_tokens_to_ids(["<think>", "</think>"])
        assert on[-2] == think[0] and off[-4::2] == think  # single tokens, as in the released tokenizer
    else:
        assert on == off


@pytest.mark.parametrize("arch", ARCHS)
def test_a_two_image_prompt_holds_one_pad_per_image_in_order(tokenizers, arch: str) -> None:
    tok = tokenizers[arch]
    pad = tok.convert_tokens_to_ids(IMAGE_PAD)
    ids = chat_prompt_ids(tok, TWO_IMAGES)
    assert ids.count(pad) == 2
    first, second = (i for i, t in enumerate(ids) if t == pad)
    between = _text(tok, ids[first + 1 : second])
    assert between == "<|vision_end|>The full image, then a zoomed crop:<|vision_start|>"
    assert chat_prompt_ids(tok, QUESTION, images=2).count(pad) == 2
    expanded = expand_image_pads(ids, pad, [3, 5])
    assert expanded.count(pad) == 8 and len(expanded) == len(ids) + 6
    with pytest.raises(ValueError, match=r"2 image pad.*3 image"):
        expand_image_pads(ids, pad, [1, 2, 3])


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


@pytest.mark.parametrize("arch", ARCHS)
def test_collate_expands_a_two_image_prompt_like_the_processor(tokenizers, arch: str) -> None:
    """Our one-pad-per-image expansion (what the learner and the transformers engine feed the model) equals the
    family's HF processor on the same text and images: ids, image-token types, pixels, grids."""
    tok, preset = tokenizers[arch], get_preset(arch, "tiny")
    processor = build_processor(preset, tok)
    full, crop = _image(0, (200, 150)), _image(1, (70, 50))  # different sizes: different pad counts
    encode = ImageEncoder(processor.image_processor, min_pixels=preset.min_pixels, max_pixels=preset.max_pixels)
    prompt = chat_prompt_ids(tok, TWO_IMAGES)
    response = tok.encode("red", add_special_tokens=False)
    batch = collate([(prompt, [encode(full), encode(crop)], response)], pad_id=0, image_pad_id=processor.image_token_id)
    ref = processor(text=[_text(tok, prompt)], images=[full, crop], return_tensors="pt")
    assert batch.input_ids[0].tolist() == ref["input_ids"][0].tolist() + response
    assert batch.mm_token_type_ids[0, : -len(response)].tolist() == ref["mm_token_type_ids"][0].tolist()
    assert torch.equal(batch.image_grid_thw, ref["image_grid_thw"]) and batch.image_grid_thw.shape[0] == 2
    assert torch.equal(batch.pixel_values, ref["pixel_values"])


def test_families_with_the_same_tokens_share_a_vocabulary(tokenizers) -> None:
    """A Qwen3.5 teacher can replay a Qwen3-VL student's token ids (same tokens); Qwen2-VL's vocabulary has no
    `<think>`, so a Qwen3.5 teacher for it is refused before any step runs."""
    same = [a for a in ARCHS if FAMILIES[a].extra_tokens == FAMILIES["qwen3_5"].extra_tokens]
    assert set(same) == {"qwen3_vl", "qwen3_5"}
    assert tokenizer_mismatch(tokenizers["qwen3_vl"], tokenizers["qwen3_5"]) is None
    assert tokenizer_mismatch(tokenizers["qwen2_vl"], tokenizers["qwen2_5_vl"]) is None
    text = "What color is the small square? red<|im_end|>"
    assert tokenizers["qwen3_vl"].encode(text) == tokenizers["qwen3_5"].encode(text)
    assert "token ids differ" in tokenizer_mismatch(tokenizers["qwen2_vl"], tokenizers["qwen3_5"])
