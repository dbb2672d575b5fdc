"""Typed records that travel between the driver and the actors.

One trajectory's path: a Parquet row becomes a `Prompt` (data stream) -> a sampler turns it into n `Trajectory`s
(student view: full image) -> the gating actor fills in the teacher log-probs and gate weights -> the learner consumes
them. Records hold plain Python lists and bytes (no tensors), so they pickle cheaply through Ray and stay readable;
the actors turn them into padded tensors at the edge.

Nothing here knows about Ray, models or files. The evaluation-only `answer` column never enters these records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels


@dataclass(frozen=True)
class Prompt:
    """One validated training row (the `answer` column is never read into it)."""

    uid: str  # the row's `id`: unique, names the group of n trajectories sampled from it
    image: bytes  # encoded full image (PNG/JPEG/WebP); already RGB-compatible after validation
    question: str
    evidence_box: Box  # question-relevant region; the positive view is its crop
    negative_box: Box | None = None  # optional user-chosen irrelevant region for the negative view
    pos_images: tuple[bytes, ...] = ()  # precomputed evidence crops, in `<crop>` order; override the box's crop
    neg_images: tuple[bytes, ...] = ()  # precomputed negatives: none, or one per crop (each swaps its crop)
    teacher_prompt: str | None = None  # the teacher's user-turn template (vzero.teacher_prompt); unset = config's
    source: str | None = None  # dataset / task family, for per-source breakdowns


@dataclass
class Trajectory:
    """One sampled response and everything the gate and the loss need about it (shapes: T = len(response_ids))."""

    # identity
    uid: str  # prompt row id = group id: the gate normalises within trajectories sharing it
    sample_index: int  # 0..n-1 within the group
    policy_version: int  # learner step whose weights produced this sample
    # student side (full image)
    prompt_ids: list[int]  # chat-formatted prompt, ONE image pad token per image (engines expand it)
    response_ids: list[int]  # (T,) sampled tokens y_1..y_T (includes the stop token when one was sampled)
    lp_old: list[float]  # (T,) log p_sampler(y_t | ...) at sampling time, under the distribution sampled
    finish_reason: str  # "stop" | "length"
    # teacher side, filled in by the gating actor (response-aligned, (T,) each)
    lp_pos: list[float] | None = None  # log p_teacher(y_t | positive view, question, y_<t)
    lp_neg: list[float] | None = None  # log p_teacher(y_t | negative view, question, y_<t)
    weight: float | None = None  # sequence gate weight w_i
    token_weights: list[float] | None = None  # (T,) token gate weights (level="token")
    teacher_topk_ids: list[list[int]] | None = None  # (T, k) positive-view top-k ids (forward_kl_topk)
    teacher_topk_logprobs: list[list[float]] | None = None  # (T, k)
    negative_mode: str | None = None  # which negative view was used (fallbacks are recorded, not hidden)

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)


@dataclass
class RolloutBatch:
    """All trajectories of one step plus the prompts they came from (keyed by uid)."""

    step: int
    prompts: dict[str, Prompt]
    trajectories: list[Trajectory]
    policy_version: int  # the one version every trajectory in this batch was sampled with
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, filled as it travels
    stats: dict[str, float] = field(default_factory=dict)  # e.g. token counts, tokens/s per stage

    @property
    def num_response_tokens(self) -> int:
        return sum(t.num_tokens for t in self.trajectories)
