"""Gated on-policy distillation losses toward the positive-view teacher: tensors in, ``(loss, metrics)`` out.

Contract: pure torch, one function per variant plus the ``gated_opd_loss`` dispatcher. It knows nothing about
models, Ray or how the gate weights were made (see ``gating/gate.py``); it gets response-aligned [B, T] log-probs
of the sampled tokens, a response mask and the gate weights ([B] per trajectory or [B, T] per token).

Variants (method notes ``vzero-method.md``, "Gated distillation loss"):

- ``k1_pg`` (default): k1_t = lp_s_t − lp+_t becomes a detached advantage, adv_t = −w·k1_t, optimised with a
  PPO-clip policy loss. This is the Thinking Machines on-policy distillation recipe: the per-token reverse KL
  is a reward, and its gradient reaches the student through the score function.
- ``k3``: w·(exp(lp+ − lp_s) − (lp+ − lp_s) − 1), back-propagated directly (Schulman's k3 estimator).
- ``forward_kl_topk``: w·KL(teacher top-k ‖ student) over the teacher's top-k tokens per position.

Back-propagating k1 directly is refused: ∇(lp_s − lp+) = ∇lp_s does not depend on the teacher at all.

Aggregation is token-mean over a caller-supplied global count of valid tokens, ``num_valid_tokens`` (like
OpenRLHF's ``aggregate_loss``): each call returns Σ_{its valid tokens} ℓ_t / N_global, so the losses (and the
gradients) of micro-batches or data-parallel shards add up to exactly the token-mean of one big batch, whatever the
split. Left as None, N is this call's own count, i.e. the plain token-mean.

Run the tests with ``.venv/bin/pytest tests/learner/test_losses.py``.
"""

from __future__ import annotations

import torch

LOSS_MODES = ("k1_pg", "k3", "forward_kl_topk")

# Modes that back-propagate k1 itself. Named so the error can say why they are wrong instead of "unknown mode".
_REFUSED_K1_MODES = ("k1", "k1_supervised")

# exp(log-ratio) guard for the importance ratio: e^20 ≈ 4.9e8 stays finite in float32 and is clipped anyway.
_LOG_RATIO_CLAMP = 20.0

# vLLM hands top-k ids back as int32 or int64; gather needs int64 and gets a cast.
_INT_DTYPES = (torch.int32, torch.int64)

METRIC_KEYS = ("k1_mean", "clip_frac", "ratio_mean", "ratio_max", "weighted_abs_signal", "loss")


def gated_opd_loss(
    student_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    weights: torch.Tensor,
    *,
    mode: str = "k1_pg",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_clamp: float = 10.0,
    logprob_min: float = -10.0,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    student_logits: torch.Tensor | None = None,
    num_valid_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Gated distillation loss for ``mode`` in ``LOSS_MODES``; see the variant functions for each formula.

    Args:
        student_logprobs: [B, T] lp_s, current student log-probs of the sampled tokens (carries the gradient).
        old_logprobs: [B, T] lp_old, the sampler's log-probs at sampling time (importance ratio; ratio metrics).
        teacher_logprobs: [B, T] lp+, positive-view teacher log-probs of the sampled tokens.
        response_mask: [B, T] bool or float; nonzero marks a real response token. Masked positions of every other
            tensor are never used, so they may hold garbage.
        weights: [B] (sequence gate) or [B, T] (token gate) gate weights; detached here.
        mode: one of ``LOSS_MODES``.
        clip_low, clip_high: PPO clip range [1 − clip_low, 1 + clip_high] for ``k1_pg``.
        kl_clamp: |k1| (and |lp+ − lp_s| inside k3) is clamped to this.
        logprob_min: lp_s and lp+ are clamped at ≥ this before forming k1 / k3.
        teacher_topk: ``(topk_ids [B, T, k] long, topk_logprobs [B, T, k])``; needed by ``forward_kl_topk``.
        student_logits: [B, T, V] raw student logits at the response positions; needed by ``forward_kl_topk``.
        num_valid_tokens: global token count N for the token-mean (see the module docstring); default: this
            call's count. Must be at least this call's count.

    Returns:
        ``(loss, metrics)``: a float32 scalar tensor connected to ``student_logprobs`` (or ``student_logits``),
        0.0 and still back-propagatable when no token is valid; ``metrics`` holds ``METRIC_KEYS`` as python floats
        over this call's valid tokens (0.0 when there are none): "k1_mean" (mean clamped k1), "clip_frac" (share
        of tokens where PPO's clipped branch is the active one; 0 for supervised modes), "ratio_mean"/"ratio_max"
        (exp(lp_s − lp_old)), "weighted_abs_signal" (mean |w·signal|, the signal being k1, k3 or the top-k KL),
        "loss".
    """
    _check_mode(mode)
    _check_shapes(student_logprobs, old_logprobs, teacher_logprobs, response_mask, weights)
    if mode == "forward_kl_topk":
        if teacher_topk is None or student_logits is None:
            missing = [n for n, v in (("teacher_topk", teacher_topk), ("student_logits", student_logits)) if v is None]
            raise ValueError(
                f"mode 'forward_kl_topk' needs teacher_topk=(topk_ids, topk_logprobs) and student_logits; "
                f"missing: {', '.join(missing)}"
            )
        return forward_kl_topk_loss(
            student_logits,
            teacher_topk[0],
            teacher_topk[1],
            student_logprobs,
            old_logprobs,
            teacher_logprobs,
            response_mask,
            weights,
            kl_clamp=kl_clamp,
            logprob_min=logprob_min,
            num_valid_tokens=num_valid_tokens,
        )
    if mode == "k3":
        return k3_loss(
            student_logprobs,
            old_logprobs,
            teacher_logprobs,
            response_mask,
            weights,
            kl_clamp=kl_clamp,
            logprob_min=logprob_min,
            num_valid_tokens=num_valid_tokens,
        )
    return k1_pg_loss(
        student_logprobs,
        old_logprobs,
        teacher_logprobs,
        response_mask,
        weights,
        clip_low=clip_low,
        clip_high=clip_high,
        kl_clamp=kl_clamp,
        logprob_min=logprob_min,
        num_valid_tokens=num_valid_tokens,
    )


def k1_pg_loss(
    student_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    weights: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_clamp: float = 10.0,
    logprob_min: float = -10.0,
    num_valid_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Gated k1 as a PPO-clip policy gradient (method notes, ``k1`` with policy gradient).

        k1_t  = clamp(max(lp_s, lp_min) − max(lp+, lp_min), −kl_clamp, kl_clamp)
        adv_t = −w · k1_t                                   (detached: k1 is a reward, not a loss)
        r_t   = exp(lp_s − lp_old)
        L     = Σ_valid −min(r_t·adv_t, clip(r_t, 1 − clip_low, 1 + clip_high)·adv_t) / N

    With every ratio inside the clip range this is exactly −Σ_valid r_t·adv_t / N, whose gradient at r = 1 is
    −adv_t / N per token log-prob. The logprob_min clamp only shapes the (detached) advantage; the ratio uses the
    raw log-probs, since clamping both sides of it would fake r = 1 for rare tokens and silence their gradient.
    """
    valid, n = _valid_and_count(response_mask, student_logprobs, num_valid_tokens)
    w = _broadcast_weights(weights, valid)
    lp_s, lp_old, lp_t = (_masked(x, valid) for x in (student_logprobs, old_logprobs, teacher_logprobs))

    k1 = _k1(lp_s, lp_t, kl_clamp, logprob_min)
    adv = (-w * k1).detach()
    # The log-ratio guard keeps exp finite, so r·adv is never inf·0 = NaN when a weight is 0.
    ratio = torch.exp((lp_s - lp_old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # −min(r·adv, clip(r)·adv) = max(−r·adv, −clip(r)·adv); the clipped branch is active where it is strictly larger.
    per_token = torch.maximum(pg_unclipped, pg_clipped)
    loss = _aggregate(per_token, valid, n)

    with torch.no_grad():
        metrics = _metrics(loss, valid, k1=k1, ratio=ratio, signal=w * k1, clipped=(pg_clipped > pg_unclipped) & valid)
    return loss, metrics


def k3_loss(
    student_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    weights: torch.Tensor,
    *,
    kl_clamp: float = 10.0,
    logprob_min: float = -10.0,
    num_valid_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Gated k3, back-propagated directly (method notes, ``k3`` supervised).

        d_t = clamp(max(lp+, lp_min) − max(lp_s, lp_min), −kl_clamp, kl_clamp)
        L   = Σ_valid w · (exp(d_t) − d_t − 1) / N

    k3 ≥ 0 with equality iff the student matches the teacher on that token; ∂k3/∂lp_s = 1 − exp(d_t), so the
    student is pushed up where the teacher is more confident. The clamps bound exp(d) by e^kl_clamp (≈ 2.2e4 at
    10), a guard like verl's ``low_var_kl`` clamps; tokens beyond them get no gradient. ``old_logprobs`` only feeds
    the ratio metrics (the loss is on-policy by construction).
    """
    valid, n = _valid_and_count(response_mask, student_logprobs, num_valid_tokens)
    w = _broadcast_weights(weights, valid)
    lp_s, lp_old, lp_t = (_masked(x, valid) for x in (student_logprobs, old_logprobs, teacher_logprobs))

    d = (lp_t.clamp_min(logprob_min) - lp_s.clamp_min(logprob_min)).clamp(-kl_clamp, kl_clamp)
    k3 = torch.exp(d) - d - 1.0
    loss = _aggregate(w * k3, valid, n)

    with torch.no_grad():
        metrics = _metrics(
            loss,
            valid,
            k1=_k1(lp_s, lp_t, kl_clamp, logprob_min),
            ratio=torch.exp((lp_s - lp_old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)),
            signal=w * k3,
            clipped=None,
        )
    return loss, metrics


def forward_kl_topk_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    weights: torch.Tensor,
    *,
    kl_clamp: float = 10.0,
    logprob_min: float = -10.0,
    num_valid_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Gated forward KL from the teacher's top-k to the student, back-propagated directly into ``student_logits``.

        p_t(j) = exp(lt_j) / Σ_{j' ∈ top-k} exp(lt_j')       teacher top-k log-probs lt, RENORMALISED over the k ids
        KL_t   = Σ_{j ∈ top-k} p_t(j) · (log p_t(j) − log_softmax(student_logits_t)[j])
        L      = Σ_valid w · KL_t / N

    Renormalising makes p_t a proper distribution, so KL_t ≥ 0 and is 0 iff the student's distribution restricted
    to the top-k ids, renormalised, matches the teacher's while putting no mass elsewhere; the mass the teacher
    gives outside its top-k (unknown from vLLM's prompt_logprobs) is ignored. ∂KL_t/∂logit_v = q_v − p_t(v).
    Only valid positions are gathered before the [N, V] log_softmax, so padding logits (and out-of-range padding
    ids) are never touched and cost no memory. The [B, T] log-prob arguments only feed the k1 and ratio metrics.
    """
    if topk_ids.dim() != 3 or topk_ids.shape[:2] != response_mask.shape or topk_ids.dtype not in _INT_DTYPES:
        raise ValueError(
            f"topk_ids must be an integer [B, T, k] tensor matching response_mask, got {_describe(topk_ids)}"
        )
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"topk_logprobs shape {tuple(topk_logprobs.shape)} != topk_ids shape {tuple(topk_ids.shape)}")
    if student_logits.dim() != 3 or student_logits.shape[:2] != response_mask.shape:
        raise ValueError(f"student_logits must be [B, T, V] matching response_mask, got {_describe(student_logits)}")
    valid, n = _valid_and_count(response_mask, student_logits, num_valid_tokens)
    w = _broadcast_weights(weights, valid)

    # [N, k] / [N, V] rows of the valid positions only.
    lt = topk_logprobs[valid].float()
    log_p = lt - torch.logsumexp(lt, dim=-1, keepdim=True)
    log_q = torch.log_softmax(student_logits[valid].float(), dim=-1).gather(-1, topk_ids[valid].long())
    p = log_p.exp()
    # Teacher ids with probability 0 (lt = −inf) contribute 0, not 0·(−inf) = NaN.
    kl_valid = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)
    kl = torch.zeros(valid.shape, dtype=kl_valid.dtype, device=kl_valid.device).masked_scatter(valid, kl_valid)
    loss = _aggregate(w * kl, valid, n)

    lp_s, lp_old, lp_t = (_masked(x, valid) for x in (student_logprobs, old_logprobs, teacher_logprobs))
    with torch.no_grad():
        metrics = _metrics(
            loss,
            valid,
            k1=_k1(lp_s, lp_t, kl_clamp, logprob_min),
            ratio=torch.exp((lp_s - lp_old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)),
            signal=w * kl,
            clipped=None,
        )
    return loss, metrics


def _k1(lp_s: torch.Tensor, lp_t: torch.Tensor, kl_clamp: float, logprob_min: float) -> torch.Tensor:
    """k1 = lp_s − lp+ after the log-prob floor, clamped to ±kl_clamp (method notes: both at 10)."""
    return (lp_s.clamp_min(logprob_min) - lp_t.clamp_min(logprob_min)).clamp(-kl_clamp, kl_clamp)


def _masked(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """float32 copy with padding replaced by 0; torch.where also sends zero gradient (not NaN) to the padding."""
    return torch.where(valid, x.float(), 0.0)


def _broadcast_weights(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B] or [B, T] gate weights -> detached float32 [B, T], zero on padding (garbage weights never leak)."""
    w = weights.detach().to(device=valid.device, dtype=torch.float32)
    w = w[:, None].expand(valid.shape) if w.dim() == 1 else w
    return torch.where(valid, w, 0.0)


def _valid_and_count(
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


def _aggregate(per_token: torch.Tensor, valid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Σ_valid ℓ_t / N. The sum goes through torch.where, so an all-padding batch gives 0 still on the graph."""
    return torch.where(valid, per_token, 0.0).sum() / n


def _metrics(
    loss: torch.Tensor,
    valid: torch.Tensor,
    *,
    k1: torch.Tensor,
    ratio: torch.Tensor,
    signal: torch.Tensor,
    clipped: torch.Tensor | None,
) -> dict[str, float]:
    """Python-float means over this call's valid tokens (0.0 when none), keyed by ``METRIC_KEYS``."""
    count = int(valid.sum().item())

    def mean(x: torch.Tensor) -> float:
        return float(x[valid].double().sum().item() / count) if count else 0.0

    return {
        "k1_mean": mean(k1),
        "clip_frac": mean(clipped.float()) if clipped is not None else 0.0,
        "ratio_mean": mean(ratio),
        "ratio_max": float(ratio[valid].max().item()) if count else 0.0,
        "weighted_abs_signal": mean(signal.abs()),
        "loss": float(loss.item()),
    }


def _check_mode(mode: str) -> None:
    if mode in _REFUSED_K1_MODES:
        raise ValueError(
            f"mode {mode!r} would back-propagate k1 = log p_student − log p_teacher directly, which is wrong: "
            "its gradient is ∇log p_student and does not depend on the teacher. Use 'k1_pg' (k1 as a detached "
            "policy-gradient advantage) or 'k3'."
        )
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {LOSS_MODES}")


def _check_shapes(
    student_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    weights: torch.Tensor,
) -> None:
    """Raise ValueError naming the argument whose shape disagrees with student_logprobs [B, T]."""
    if student_logprobs.dim() != 2 or not student_logprobs.is_floating_point():
        raise ValueError(f"student_logprobs must be a floating-point [B, T] tensor, got {_describe(student_logprobs)}")
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


def _describe(x: torch.Tensor) -> str:
    return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
