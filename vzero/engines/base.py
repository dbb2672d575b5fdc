"""The one narrow interface every rollout / scoring engine implements (vLLM where installed, transformers fallback).

Samplers call `generate`, the gating actor calls `score`, both receive new weights through `load_weights` (or, for
the collective transport, `join_weight_group` once and `receive_weights` per push). Requests
carry prompt ids with ONE image pad per image plus the PIL images in pad order (e.g. [full image, crop] for a teacher
that sees both); engines do their own image expansion and refuse a request whose pad count differs from its image
count. Log-probs are raw (log_softmax of the logits at temperature 1), the same quantity on every engine, except the
sampled-token log-probs of an engine built with `processed_logprobs`: those of the distribution sampled,
log_softmax((logits with the banned ids at -inf) / temperature), which a learner recomputes with
`response_logprobs(temperature=...)`.

Knows nothing about Ray, the gate or the loss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    from vzero.weight_group import GroupSpec
    from vzero.weights import BucketPlan


def _image_list(images: Image.Image | Sequence[Image.Image]) -> list[Image.Image]:
    """A request's images as a list (a single PIL image is accepted for the common one-image prompt)."""
    out = [images] if isinstance(images, Image.Image) else list(images)
    if not out:
        raise ValueError("a request needs at least one image")
    return out


@dataclass
class GenerateRequest:
    prompt_ids: list[int]  # chat prompt, one image pad per image
    images: list[Image.Image]  # in pad order

    def __post_init__(self) -> None:
        self.images = _image_list(self.images)


@dataclass
class SamplingSpec:
    n: int
    temperature: float  # 0 = greedy (evaluation)
    top_p: float
    max_tokens: int
    seed: int  # request i uses seed + i (and vLLM child j of it seed + i + j): reproducible for a step


@dataclass
class Sample:
    response_ids: list[int]  # (T,) includes the stop token when one was sampled
    logprobs: list[float]  # (T,) sampled-token log-probs
    finish_reason: str  # "stop" | "length"


@dataclass
class ScoreRequest:
    prompt_ids: list[int]  # one image pad per image
    images: list[Image.Image]  # in pad order
    response_ids: list[int]
    topk: int = 0  # also return the top-k log-probs per response position (forward-KL top-k loss)

    def __post_init__(self) -> None:
        self.images = _image_list(self.images)


def check_image_pads(requests: Sequence[GenerateRequest | ScoreRequest], pad_id: int, limit: int | None = None) -> None:
    """Every request holds one image pad per image (and at most `limit` images); the error names the request."""
    for i, r in enumerate(requests):
        pads = r.prompt_ids.count(pad_id)
        if pads != len(r.images):
            raise ValueError(f"request {i}: {pads} image pad(s) in prompt_ids but {len(r.images)} image(s)")
        if limit is not None and len(r.images) > limit:
            raise ValueError(
                f"request {i}: {len(r.images)} images, more than this engine's limit of {limit} "
                "(raise vllm.max_images_per_prompt for this model)"
            )


@dataclass
class ScoreResult:
    logprobs: list[float]  # (T,) log p(response_t | prompt, image, response_<t)
    topk_ids: list[list[int]] | None = None  # (T, k)
    topk_logprobs: list[list[float]] | None = None  # (T, k)


def banned_token_ids(tokenizer: object, vocab_size: int) -> list[int]:
    """Ids a sampler must never emit: vision placeholders, and lm_head rows past the tokenizer (no token behind them).

    A random-init model (or a real one: Qwen's lm_head has ~270 padding rows) can sample either; a sampled
    `<|image_pad|>` makes the response unreplayable, an id without a token cannot be decoded.
    """
    from vzero.models.loading import vision_token_ids

    return sorted(set(vision_token_ids(tokenizer)) | set(range(len(tokenizer), vocab_size)))


class Engine(ABC):
    """A model that can sample, score and take new weights in place."""

    name: str = "engine"
    scoring: str = "per_request"  # or "shared_prefix": each prompt's prefix computed once per `score` call
    tokenizer: object  # the HF tokenizer of the served model (chat template, special ids)

    @abstractmethod
    def generate(self, requests: list[GenerateRequest], spec: SamplingSpec) -> list[list[Sample]]:
        """n samples per request, in request order."""

    @abstractmethod
    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Teacher-forced log-probs of each request's response tokens (and the top-k per position if asked)."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load HF-named tensors in place; returns the number of tensors loaded. Caches are reset afterwards."""

    workers: int = 1  # processes holding the model (a tensor-parallel vLLM engine: tp); each joins a weight group

    def join_weight_group(self, spec: GroupSpec, rank_offset: int) -> None:
        """Join a collective weight group (vzero/weight_group.py) with every worker, worker w at rank
        `rank_offset + w`; blocks until the sender joined too."""
        raise NotImplementedError(f"the {self.name} engine cannot receive collective weight pushes")

    def receive_weights(self, plan: list[BucketPlan], version: int, *, load: bool = True) -> int:
        """Receive one collective push on every worker and load it in place (`load=False`: take part, discard);
        caches are reset afterwards. Returns the number of tensors received."""
        raise NotImplementedError(f"the {self.name} engine cannot receive collective weight pushes")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources."""
