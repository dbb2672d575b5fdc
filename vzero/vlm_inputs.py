"""Turning (question, images, response) into model inputs, the same way on every side.

Contract: a prompt is kept as token ids with ONE image pad token per image, in image order (`prompt_ids`). That form
is what vLLM wants for token prompts (it expands each pad itself) and it is independent of the image sizes, so the
student (full image) and the teacher (a crop of another size, or the full image and a crop) share it. Only right
before a transformers forward do we expand the i-th pad into `prod(grid_thw_i) / merge**2` copies, from the image
processor's own grid for that image and pixel budget.

Knows nothing about Ray, engines or training; used by the engines, the actors, the learner and evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vzero.config import ChatOptions

IMAGE_PAD = "<|image_pad|>"
UserContent = str | Sequence[dict[str, Any]]


def user_parts(content: UserContent, *, images: int = 1) -> list[dict[str, Any]]:
    """The user turn as chat-template content parts: a plain question means `images` images, then the question;
    a list is taken as it is (HF chat format: `{"type": "image"}` and `{"type": "text", "text": ...}` parts, e.g.
    [image, "the full image; a zoomed crop:", image, question] for a two-image teacher prompt)."""
    if isinstance(content, str):
        return [*({"type": "image"} for _ in range(images)), {"type": "text", "text": content}]
    return [dict(part) for part in content]


def chat_prompt_ids(
    tokenizer: Any, content: UserContent, chat: ChatOptions | None = None, *, images: int = 1
) -> list[int]:
    """Chat-formatted prompt ids (generation prompt appended) with one image pad per image part, in order.

    `chat` holds the model's template options (`ModelSource.chat`: system turn, thinking); every caller passes
    the same options for the same model, so sampler, teacher and evaluation prompts agree.
    """
    chat = chat or ChatOptions()
    parts = user_parts(content, images=images)
    messages: list[dict[str, Any]] = []
    if chat.system_prompt is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": chat.system_prompt}]})
    messages.append({"role": "user", "content": parts})
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=chat.enable_thinking
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    want = sum(1 for p in parts if p.get("type") == "image")
    got = ids.count(tokenizer.convert_tokens_to_ids(IMAGE_PAD))
    if got != want:
        raise ValueError(
            f"the chat template produced {got} image pads for {want} image(s); expected one per image "
            "(is this a Qwen-VL tokenizer with its chat template?)"
        )
    return ids


def expand_image_pads(prompt_ids: list[int], pad_id: int, num_pads: int | Sequence[int]) -> list[int]:
    """Replace the i-th single pad token with `num_pads[i]` copies (what the HF processor does to text prompts)."""
    counts = [num_pads] if isinstance(num_pads, int) else list(num_pads)
    if prompt_ids.count(pad_id) != len(counts):
        raise ValueError(
            f"the prompt holds {prompt_ids.count(pad_id)} image pad(s) but {len(counts)} image(s) were given: "
            "prompt ids need exactly one pad per image, in image order"
        )
    out: list[int] = []
    it = iter(counts)
    for token in prompt_ids:
        if token == pad_id:
            out.extend([pad_id] * next(it))
        else:
            out.append(token)
    return out


@dataclass
class EncodedImage:
    pixel_values: torch.Tensor  # [num_patches, C*T*P*P] flattened patches, as the Qwen-VL vision tower takes them
    grid_thw: torch.Tensor  # [1, 3] (t, h, w) in patches
    num_pads: int  # image tokens after the spatial merge = prod(grid_thw) / merge**2


class ImageEncoder:
    """Qwen-VL image preprocessing at a fixed pixel budget, identical for generate, score and train."""

    def __init__(self, image_processor: Any, *, min_pixels: int, max_pixels: int):
        self.image_processor = image_processor
        self.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
        self.merge = int(getattr(image_processor, "merge_size", 2))

    def __call__(self, image: Image.Image) -> EncodedImage:
        out = self.image_processor(images=[image], size=self.size, return_tensors="pt")
        grid = out["image_grid_thw"]
        return EncodedImage(out["pixel_values"], grid, int(grid.prod().item()) // (self.merge**2))


@dataclass
class SequenceBatch:
    """Left-padded prompt+response sequences with their images: every row's response ends at the last position."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    mm_token_type_ids: torch.Tensor  # [B, L] 1 on image tokens (M-RoPE needs it)
    pixel_values: torch.Tensor  # [sum patches, D]
    image_grid_thw: torch.Tensor  # [number of images, 3], row by row, each row's images in order
    response_lengths: list[int]  # T_i per row
    max_response: int  # max T_i (the width of response-aligned outputs)

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.mm_token_type_ids.to(device),
            self.pixel_values.to(device),
            self.image_grid_thw.to(device),
            self.response_lengths,
            self.max_response,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum().item())


Images = EncodedImage | Sequence[EncodedImage]


def collate(rows: list[tuple[list[int], Images, list[int]]], *, pad_id: int, image_pad_id: int) -> SequenceBatch:
    """(prompt_ids with one pad per image, encoded image(s) in pad order, response_ids) rows -> a left-padded batch.

    Left padding puts every response at the end, so one `logits_to_keep = max_T + 1` slice covers all rows.
    """
    seqs, encoded = [], []
    for prompt_ids, images, response_ids in rows:
        encs = [images] if isinstance(images, EncodedImage) else list(images)
        encoded.extend(encs)
        seqs.append(expand_image_pads(prompt_ids, image_pad_id, [e.num_pads for e in encs]) + list(response_ids))
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
        attention[i, L - len(s) :] = 1
    lengths = [len(r[2]) for r in rows]
    return SequenceBatch(
        input_ids=input_ids,
        attention_mask=attention,
        mm_token_type_ids=((input_ids == image_pad_id) & attention.bool()).to(torch.int32),
        pixel_values=torch.cat([e.pixel_values for e in encoded], dim=0),
        image_grid_thw=torch.cat([e.grid_thw for e in encoded], dim=0),
        response_lengths=lengths,
        max_response=max(lengths) if lengths else 0,
    )
