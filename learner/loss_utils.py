"""Plumbing shared by the loss variants in ``learner/losses.py``: masks, the token-mean, metrics, argument checks.

Contract: pure torch on [B, T] tensors and a response mask; padding is never read (``masked`` replaces it before any
arithmetic, so garbage or inf there can't leak into a loss, a gradient or a metric).
"""

from __future__ import annotations

import torch

METRIC_KEYS = (
    "k1_mean",
    "clip_frac",
    "dual_clip_frac",
    "clamp_frac",
    "ratio_mean",
    "ratio_max",
    "weighted_abs_signal",
    "loss",
)


def masked(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """float32 copy with padding replaced by 0; torch.where also sends zero gradient (not NaN) to the padding."""
    return torch.where(valid, x.float(), 0.0)


def broadcast_weights(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B] or [B, T] gate weights -> detached float32 [B, T], zero on padding (garbage weights never leak)."""
    w = weights.detach().to(device=valid.device, dtype=torch.float32)
    w = w[:, None].expand(valid.shape) if w.dim() == 1 else w
    return torch.where(valid, w, 0.0)


def valid_and_count(
    response_mask: torch.Tensor, like: torch.Tensor, num_valid_tokens: int | float | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean valid mask and the token-mean denominator N (float32 tensor, at least 1 so N = 0 gives loss 0)."""
    valid = response_mask.to(like.device) != 0
    local = valid.sum()
    if num_valid_tokens is None:
        n = local.float()
    else:
        n = torch.as_tensor(num_valid_tokens, dtype=torch.float32, device=like.device)
        if n.dim() != 0:
            raise ValueError(f"num_valid_tokens must be a scalar, got shape {tuple(n.shape)}")
        if n.item() < local.item():
            raise ValueError(
                f"num_valid_tokens={n.item():g} is smaller than this call's {local.item()} valid tokens; it must be "
                "the global count over all micro-batches / data-parallel shards that are summed"
            )
    return valid, n.clamp_min(1.0)


def aggregate(per_token: torch.Tensor, valid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Σ_valid ℓ_t / N. The sum goes through torch.where, so an all-padding batch gives 0 still on the graph."""
    return torch.where(valid, per_token, 0.0).sum() / n


def token_metrics(
    loss: torch.Tensor,
    valid: torch.Tensor,
    *,
    k1: torch.Tensor,
    ratio: torch.Tensor,
    signal: torch.Tensor,
    clipped: torch.Tensor | None = None,
    dual: torch.Tensor | None = None,
    clamped: torch.Tensor,
) -> dict[str, float]:
    """Python-float means over this call's valid tokens (0.0 when none), keyed by ``METRIC_KEYS``."""
    count = int(valid.sum().item())

    def mean(x: torch.Tensor) -> float:
        return float(x[valid].double().sum().item() / count) if count else 0.0

    return {
        "k1_mean": mean(k1),
        "clip_frac": mean(clipped.float()) if clipped is not None else 0.0,
        "dual_clip_frac": mean(dual.float()) if dual is not None else 0.0,
        "clamp_frac": mean(clamped.float()),
        "ratio_mean": mean(ratio),
        "ratio_max": float(ratio[valid].max().item()) if count else 0.0,
        "weighted_abs_signal": mean(signal.abs()),
        "loss": float(loss.item()),
    }


def check_shapes(
    student_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    weights: torch.Tensor,
) -> None:
    """Raise ValueError naming the argument whose shape disagrees with student_logprobs [B, T]."""
    if student_logprobs.dim() != 2 or not student_logprobs.is_floating_point():
        raise ValueError(f"student_logprobs must be a floating-point [B, T] tensor, got {describe(student_logprobs)}")
    shape = student_logprobs.shape
    for name, t in (
        ("old_logprobs", old_logprobs),
        ("teacher_logprobs", teacher_logprobs),
        ("response_mask", response_mask),
    ):
        if t.shape != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != student_logprobs shape {tuple(shape)}")
    if weights.shape not in (shape[:1], shape):
        raise ValueError(
            f"weights must be [B]={tuple(shape[:1])} (sequence gate) or [B, T]={tuple(shape)} (token gate), "
            f"got {tuple(weights.shape)}"
        )


def describe(x: torch.Tensor) -> str:
    return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
