"""Supervised fine-tuning WITH answer labels: how the toy recipe makes its teacher (never part of V-Zero training).

Loss: the mean negative log-likelihood of the answer tokens followed by `<|im_end|>`, teacher-forced after the same
chat prompt the student and teacher use (`chat_prompt_ids`: system, then one image + the question), i.e.
`-mean_t log p(y_t | image, question, y_<t)` over all answer tokens of the batch, computed with `response_logprobs`
(so SFT, replay and the learner share one forward). The image is the evidence crop (`view="crop"`: the teacher's
positive view) or the full image (`view="full"`). Labels come from `vzero.eval.evaluate.iter_labeled`, the project's
one reader of the `answer` column; invalid rows are counted and skipped (reported in the result).

`train_sft(init_dir, out_dir, data, ...)` writes a complete HF model directory (weights + tokenizer/processor files)
and returns the loss curve. Plain AdamW, fixed lr, gradient clipping; batches are drawn with a seeded RNG.
Knows nothing about Ray or the gate.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vzero.checkpoint import PROCESSOR_FILES
from vzero.eval.evaluate import LabeledRow, eval_image, iter_labeled
from vzero.logprobs import response_logprobs
from vzero.models.loading import load_model, load_processor
from vzero.views import DEFAULT_MARGIN
from vzero.vlm_inputs import EncodedImage, ImageEncoder, SequenceBatch, chat_prompt_ids, collate

IM_END = "<|im_end|>"


@dataclass
class SFTResult:
    """What `train_sft` did."""

    out_dir: Path
    losses: list[float]  # per optimizer step, mean NLL per answer token
    examples: int  # valid labelled rows trained on
    invalid: dict[str, int] = field(default_factory=dict)  # reason -> count of rows skipped
    seconds: float = 0.0


class SFTBatcher:
    """Labelled rows -> `SequenceBatch`es of (chat prompt, view image, answer + <|im_end|>); encodings are cached."""

    def __init__(
        self,
        processor: Any,
        rows: list[LabeledRow],
        *,
        view: Literal["crop", "full"],
        min_pixels: int,
        max_pixels: int,
        margin: float = DEFAULT_MARGIN,
    ):
        if not rows:
            raise ValueError("no valid labelled rows to train on")
        tok = processor.tokenizer
        self.encoder = ImageEncoder(processor.image_processor, min_pixels=min_pixels, max_pixels=max_pixels)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.image_pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
        end = tok.convert_tokens_to_ids(IM_END)
        self.rows = rows
        self.view, self.margin, self.max_pixels = view, margin, max_pixels
        self.prompts = [chat_prompt_ids(tok, r.prompt.question) for r in rows]
        self.targets = [[*tok.encode(r.answer, add_special_tokens=False), end] for r in rows]
        self._images: dict[int, EncodedImage] = {}

    def batch(self, indices: list[int]) -> SequenceBatch:
        out = []
        for i in indices:
            if i not in self._images:
                img = eval_image(self.rows[i].prompt, self.view, margin=self.margin, max_pixels=self.max_pixels)
                self._images[i] = self.encoder(img)
            out.append((self.prompts[i], self._images[i], self.targets[i]))
        return collate(out, pad_id=self.pad_id, image_pad_id=self.image_pad_id)


def sft_loss(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Mean NLL per answer token of the batch (gradients flow iff enabled)."""
    res = response_logprobs(model, batch)
    return -(res.logprobs * res.mask).sum() / res.mask.sum().clamp(min=1)


def train_sft(
    init_dir: str | Path,
    out_dir: str | Path,
    data: str | Path,
    *,
    view: Literal["crop", "full"] = "crop",
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 16,
    min_pixels: int,
    max_pixels: int,
    margin: float = DEFAULT_MARGIN,
    seed: int = 0,
    device: str = "cpu",
    limit: int | None = None,
) -> SFTResult:
    """Fine-tune the model in `init_dir` on `data`'s labels for `steps` steps; save it to `out_dir`."""
    t0 = time.perf_counter()
    rows: list[LabeledRow] = []
    invalid: dict[str, int] = {}
    for item in iter_labeled(data, limit=limit):
        if isinstance(item, str):
            invalid[item] = invalid.get(item, 0) + 1
        else:
            rows.append(item)
    processor = load_processor(init_dir)
    batcher = SFTBatcher(processor, rows, view=view, min_pixels=min_pixels, max_pixels=max_pixels, margin=margin)
    torch.manual_seed(seed)
    model = load_model(init_dir, dtype="float32", device=device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    for _ in range(steps):
        if len(order) < batch_size:  # epochs of shuffled rows; a batch never repeats a row
            order += rng.sample(range(len(rows)), len(rows))
        idx, order = order[:batch_size], order[batch_size:]
        loss = sft_loss(model, batcher.batch(idx).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    save_model_dir(model, init_dir, out_dir)
    return SFTResult(Path(out_dir), losses, len(rows), invalid, time.perf_counter() - t0)


def save_model_dir(model: torch.nn.Module, source_dir: str | Path, out_dir: str | Path) -> Path:
    """`save_pretrained` (safetensors) plus the source directory's tokenizer/processor files: a loadable model dir."""
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    for name in PROCESSOR_FILES:
        src = Path(source_dir) / name
        if src.is_file():
            shutil.copy2(src, out / name)
    return out
