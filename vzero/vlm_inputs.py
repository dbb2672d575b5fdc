"""Turning (question, image, response) into model inputs, the same way on every side.

Contract: a prompt is kept as token ids with ONE image pad token per image (`prompt_ids`). That form is what vLLM
wants for token prompts (it expands the pad itself) and it is independent of the image size, so the student (full
image) and the teacher (a crop of another size) share it. Only right before a transformers forward do we expand the
pad into `prod(grid_thw) / merge**2` copies, from the image processor's own grid for that image and pixel budget.

Knows nothing about Ray, engines or training; used by the transformers engine, the learner and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

DEFAULT_SYSTEM = "You are a helpful assistant."


def chat_prompt_ids(tokenizer: Any, question: str, *, system: str = DEFAULT_SYSTEM) -> list[int]:
    """Chat-formatted prompt ids (generation prompt appended) with a single image placeholder before the question."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    if ids.count(pad) != 1:
        raise ValueError(
            f"the chat template produced {ids.count(pad)} image pads for one image; expected exactly 1 "
            "(is this a Qwen-VL tokenizer with its chat template?)"
        )
    return ids


def expand_image_pads(prompt_ids: list[int], pad_id: int, num_pads: int) -> list[int]:
    """Replace the single pad token with `num_pads` copies (what the HF processor does to text prompts)."""
    i = prompt_ids.index(pad_id)
    return prompt_ids[:i] + [pad_id] * num_pads + prompt_ids[i + 1 :]


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
    image_grid_thw: torch.Tensor  # [B, 3]
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


def collate(rows: list[tuple[list[int], EncodedImage, list[int]]], *, pad_id: int, image_pad_id: int) -> SequenceBatch:
    """(prompt_ids with one pad, encoded image, response_ids) rows -> a left-padded batch.

    Left padding puts every response at the end, so one `logits_to_keep = max_T + 1` slice covers all rows.
    """
    seqs = []
    for prompt_ids, enc, response_ids in rows:
        seqs.append(expand_image_pads(prompt_ids, image_pad_id, enc.num_pads) + list(response_ids))
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
        pixel_values=torch.cat([r[1].pixel_values for r in rows], dim=0),
        image_grid_thw=torch.cat([r[1].grid_thw for r in rows], dim=0),
        response_lengths=lengths,
        max_response=max(lengths) if lengths else 0,
    )
