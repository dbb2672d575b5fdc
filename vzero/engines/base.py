"""The one narrow interface every rollout / scoring engine implements (vLLM where installed, transformers fallback).

Samplers call `generate`, the gating actor calls `score`, both receive new weights through `load_weights` (or, for
the collective transport, `join_weight_group` once and `receive_weights` per push). Requests
carry prompt ids with ONE image pad per image plus a PIL image; engines do their own image expansion. Log-probs are
raw (log_softmax of the logits at temperature 1), the same quantity on every engine.

Knows nothing about Ray, the gate or the loss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    from vzero.weight_group import GroupSpec
    from vzero.weights import BucketPlan


@dataclass
class GenerateRequest:
    prompt_ids: list[int]  # chat prompt, one image pad
    image: Image.Image


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
    prompt_ids: list[int]  # one image pad
    image: Image.Image
    response_ids: list[int]
    topk: int = 0  # also return the top-k log-probs per response position (forward-KL top-k loss)


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
