"""Gated on-policy distillation losses toward the positive-view teacher: tensors in, ``(loss, metrics)`` out.

Contract: pure torch, one function per variant plus the ``gated_opd_loss`` dispatcher. It knows nothing about
models, Ray or how the gate weights were made (see ``gating/gate.py``); it gets response-aligned [B, T] log-probs
of the sampled tokens, a response mask and the gate weights ([B] per trajectory or [B, T] per token).

Variants (method notes ``vzero-method.md``, "Gated distillation loss" and "The authors' recipe, point by point"):

- ``k1_pg`` (default): k1_t = lp_s_t − lp+_t (raw, clamped to ±10) becomes a detached advantage, adv_t = −w·k1_t,
  optimised with a PPO-clip policy loss (optionally dual-clip). This is the Thinking Machines on-policy distillation
  recipe: the per-token reverse KL is a reward, and its gradient reaches the student through the score function.
- ``k3``: w·min(exp(lp+ − lp_s) − (lp+ − lp_s) − 1, 10), back-propagated directly (Schulman's k3 estimator).
- ``forward_kl_topk``: w·clamp(KL(teacher top-k ‖ student), 0, 10) over the teacher's top-k tokens per position.

The defaults are the authors' (their verl fork); each of our earlier choices is kept as a named switch:
``floor_sampled_logprobs`` (the −10 log-prob floor also on k1 / k3) and ``topk_renormalize`` (a proper KL over the
renormalised top-k). Back-propagating k1 directly is refused: ∇(lp_s − lp+) = ∇lp_s does not depend on the teacher.

Aggregation is token-mean over a caller-supplied global count of valid tokens, ``num_valid_tokens`` (like
OpenRLHF's ``aggregate_loss``): each call returns Σ_{its valid tokens} ℓ_t / N_global, so the losses (and the
gradients) of micro-batches or data-parallel shards add up to exactly the token-mean of one big batch, whatever the
split. Left as None, N is this call's own count, i.e. the plain token-mean. The learner passes the count of one
optimizer mini-batch (verl's token-mean per mini-batch).

Run the tests with ``.venv/bin/pytest tests/learner/test_losses.py``.
"""

from __future__ import annotations

import torch

from learner.loss_utils import (
    METRIC_KEYS,
    aggregate,
    broadcast_weights,
    check_shapes,
    describe,
    masked,
    token_metrics,
    valid_and_count,
)

__all__ = ["LOSS_MODES", "METRIC_KEYS", "forward_kl_topk_loss", "gated_opd_loss", "k1_pg_loss", "k3_loss"]

LOSS_MODES = ("k1_pg", "k3", "forward_kl_topk")

# Modes that back-propagate k1 itself. Named so the error can say why they are wrong instead of "unknown mode".
_REFUSED_K1_MODES = ("k1", "k1_supervised")

# exp(log-ratio) guard for the importance ratio and k3: e^20 ≈ 4.9e8 stays finite in float32 (verl's kl_penalty and
# policy loss clamp at ±20 too). A ratio that large is clipped anyway (or dual-clipped), and k3 at |d| = 20 is already
# past any kl_clamp below 19, so the guard only keeps inf and NaN out.
_LOG_RATIO_CLAMP = 20.0

# vLLM hands top-k ids back as int32 or int64; gather needs int64 and gets a cast.
_INT_DTYPES = (torch.int32, torch.int64)


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
    dual_clip_c: float | None = None,
    kl_clamp: float = 10.0,
    logprob_min: float = -10.0,
    floor_sampled_logprobs: bool = False,
    topk_renormalize: bool = False,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    student_logits: torch.Tensor | None = None,
    num_valid_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Gated distillation loss for ``mode`` in ``LOSS_MODES``; see the variant functions for each formula.

    Args:
        student_logprobs: [B, T] lp_s, current student log-probs of the sampled tokens (carries the gradient).
        old_logprobs: [B, T] lp_old, the behaviour log-probs for the importance ratio (the sampler's, or the
            learner's own recomputed before the step's first update); ratio metrics in the supervised modes.
        teacher_logprobs: [B, T] lp+, positive-view teacher log-probs of the sampled tokens.
        response_mask: [B, T] bool or float; nonzero marks a real response token. Masked positions of every other
            tensor are never used, so they may hold garbage.
        weights: [B] (sequence gate) or [B, T] (token gate) gate weights; detached here.
        mode: one of ``LOSS_MODES``.
        clip_low, clip_high: PPO clip range [1 − clip_low, 1 + clip_high] for ``k1_pg``.
        dual_clip_c: ``k1_pg`` only: cap −adv·r at −adv·c for negative advantages (dual-clip PPO, c > 1); None = off.
        kl_clamp: k1 to ±kl_clamp; the k3 value and the top-k KL to at most kl_clamp (tokens beyond: no gradient).
        logprob_min: floor of both sides of the top-k KL; of lp_s and lp+ in k1 / k3 only with
            ``floor_sampled_logprobs``.
        floor_sampled_logprobs: also floor lp_s and lp+ at ``logprob_min`` before k1 / k3 (ours; the authors: off).
        topk_renormalize: renormalise the teacher's top-k into a distribution, no floor or clamp (ours; the
            authors: off).
        teacher_topk: ``(topk_ids [B, T, k] long, topk_logprobs [B, T, k])``; needed by ``forward_kl_topk``.
        student_logits: [B, T, V] raw student logits at the response positions; needed by ``forward_kl_topk``.
        num_valid_tokens: global token count N for the token-mean (see the module docstring); default: this
            call's count. Must be at least this call's count.

    Returns:
        ``(loss, metrics)``: a float32 scalar tensor connected to ``student_logprobs`` (or ``student_logits``),
        0.0 and still back-propagatable when no token is valid; ``metrics`` holds ``METRIC_KEYS`` as python floats
        over this call's valid tokens (0.0 when there are none): "k1_mean" (mean clamped k1), "clip_frac" (share
        of tokens where PPO's clipped branch is the active one; 0 for supervised modes), "dual_clip_frac" (share
        where the dual-clip cap is active), "clamp_frac" (share whose signal hit its clamp: |k1| ≥ kl_clamp, or a
        k3 / top-k KL outside its range, which then sends no gradient), "ratio_mean"/"ratio_max"
        (exp(lp_s − lp_old)), "weighted_abs_signal" (mean |w·signal|, the signal being k1, k3 or the top-k KL),
        "loss".
    """
    _check_mode(mode)
    check_shapes(student_logprobs, old_logprobs, teacher_logprobs, response_mask, weights)
    floor = logprob_min if floor_sampled_logprobs else None
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
            renormalize=topk_renormalize,
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
            logprob_floor=floor,
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
        dual_clip_c=dual_clip_c,
        kl_clamp=kl_clamp,
        logprob_floor=floor,
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
    dual_clip_c: float | None = None,
    kl_clamp: float = 10.0,
    logprob_floor: float | None = None,
    num_valid_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Gated k1 as a PPO-clip policy gradient (method notes, ``k1`` with policy gradient; the authors' recipe).

        k1_t  = clamp(lp_s − lp+, −kl_clamp, kl_clamp)      (raw log-probs; floored first iff logprob_floor is set)
        adv_t = −w · k1_t                                   (detached: k1 is a reward, not a loss)
        r_t   = exp(lp_s − lp_old)
        ℓ_t   = −min(r_t·adv_t, clip(r_t, 1 − clip_low, 1 + clip_high)·adv_t)
        ℓ_t   = min(ℓ_t, −c·adv_t)  where adv_t < 0          (dual-clip, only with dual_clip_c = c)
        L     = Σ_valid ℓ_t / N

    With every ratio inside the clip range this is exactly −Σ_valid r_t·adv_t / N, whose gradient at r = 1 is
    −adv_t / N per token log-prob. A floor only shapes the (detached) advantage; the ratio always uses the raw
    log-probs, since flooring both sides of it would fake r = 1 for rare tokens and silence their gradient. The
    dual clip (Ye et al. 2020, verl's ``clip_ratio_c``) bounds what one token with a negative advantage and a huge
    ratio can contribute: a stale or drifted sample can't dominate the step.
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (the cap sits above the clip range), got {dual_clip_c}")
    valid, n = valid_and_count(response_mask, student_logprobs, num_valid_tokens)
    w = broadcast_weights(weights, valid)
    lp_s, lp_old, lp_t = (masked(x, valid) for x in (student_logprobs, old_logprobs, teacher_logprobs))

    k1 = _k1(lp_s, lp_t, kl_clamp, logprob_floor)
    adv = (-w * k1).detach()
    # The log-ratio guard keeps exp finite, so r·adv is never inf·0 = NaN when a weight is 0.
    ratio = torch.exp((lp_s - lp_old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # −min(r·adv, clip(r)·adv) = max(−r·adv, −clip(r)·adv); the clipped branch is active where it is strictly larger.
    per_token = torch.maximum(pg_unclipped, pg_clipped)
    dual = None
    if dual_clip_c is not None:
        cap = -adv * dual_clip_c
        dual = (adv < 0) & (per_token > cap) & valid
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    loss = aggregate(per_token, valid, n)

    with torch.no_grad():
        metrics = token_metrics(
            loss,
            valid,
            k1=k1,
            ratio=ratio,
            signal=w * k1,
            clipped=(pg_clipped > pg_unclipped) & valid,
            dual=dual,
            clamped=_k1_raw(lp_s, lp_t, logprob_floor).abs() >= kl_clamp,
        )
    return loss, metrics


def k3_loss(
    student_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    weights: torch.Tensor,
    *,
    kl_clamp: float = 10.0,
    logprob_floor: float | None = None,
    num_valid_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Gated k3, back-propagated directly (method notes, ``k3`` supervised; the authors' clamp).

        d_t  = lp+ − lp_s                                    (raw log-probs; floored first iff logprob_floor is set)
        k3_t = min(exp(d_t) − d_t − 1, kl_clamp)
        L    = Σ_valid w · k3_t / N

    k3 ≥ 0 with equality iff the student matches the teacher on that token; ∂k3/∂lp_s = 1 − exp(d_t), so the
    student is pushed up where the teacher is more confident. The clamp is on the k3 VALUE (as the authors' verl
    ``kl_penalty``): one token contributes at most kl_clamp, and a token beyond it (d ≳ 2.6 or d ≲ −11 at 10) sends
    no gradient. Clamping d instead, as this function did before, let one token's loss reach e^10 ≈ 2.2e4.
    ``old_logprobs`` only feeds the ratio metrics (the loss is on-policy by construction).
    """
    valid, n = valid_and_count(response_mask, student_logprobs, num_valid_tokens)
    w = broadcast_weights(weights, valid)
    lp_s, lp_old, lp_t = (masked(x, valid) for x in (student_logprobs, old_logprobs, teacher_logprobs))

    d = -_k1_raw(lp_s, lp_t, logprob_floor).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    k3_raw = torch.exp(d) - d - 1.0
    k3 = k3_raw.clamp_max(kl_clamp)
    loss = aggregate(w * k3, valid, n)

    with torch.no_grad():
        metrics = token_metrics(
            loss,
            valid,
            k1=_k1(lp_s, lp_t, kl_clamp, logprob_floor),
            ratio=torch.exp((lp_s - lp_old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)),
            signal=w * k3,
            clamped=k3_raw > kl_clamp,
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
    renormalize: bool = False,
    num_valid_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Gated forward KL from the teacher's top-k to the student, back-propagated directly into ``student_logits``.

    Default (the authors'): the teacher's top-k log-probs lt are used as they are (their mass P = Σ exp(lt) ≤ 1),
    both sides floored at logprob_min, the per-token value clamped to [0, kl_clamp] (tokens outside: no gradient):

        lt'_j = max(lt_j, lp_min),   lq'_j = max(log_softmax(student_logits_t)[j], lp_min)
        KL_t  = clamp(Σ_{j ∈ top-k} exp(lt'_j) · (lt'_j − lq'_j), 0, kl_clamp)

    ∂KL_t/∂logit_v = P·q_v − p_v over the unfloored ids; a top-k id the student gives less than e^lp_min sends no
    gradient. Without renormalisation the sum can go negative (the student puts more mass on the top-k than the
    teacher): the clamp at 0 then stops it.

    ``renormalize=True`` (ours, the default before #12): p = softmax(lt) over the k ids, no floor, no clamp,

        KL_t = Σ_{j ∈ top-k} p(j) · (log p(j) − log_softmax(student_logits_t)[j])

    which is ≥ 0, is 0 iff the student gives the top-k ids all its mass in the teacher's proportions, and pushes up
    every top-k id however unlikely the student finds it (∂KL_t/∂logit_v = q_v − p(v)); the mass the teacher puts
    outside its top-k is ignored. Only valid positions are gathered before the [N, V] log_softmax, so padding
    logits (and out-of-range padding ids) are never touched and cost no memory. The [B, T] log-prob arguments only
    feed the k1 and ratio metrics.
    """
    if topk_ids.dim() != 3 or topk_ids.shape[:2] != response_mask.shape or topk_ids.dtype not in _INT_DTYPES:
        raise ValueError(
            f"topk_ids must be an integer [B, T, k] tensor matching response_mask, got {describe(topk_ids)}"
        )
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"topk_logprobs shape {tuple(topk_logprobs.shape)} != topk_ids shape {tuple(topk_ids.shape)}")
    if student_logits.dim() != 3 or student_logits.shape[:2] != response_mask.shape:
        raise ValueError(f"student_logits must be [B, T, V] matching response_mask, got {describe(student_logits)}")
    valid, n = valid_and_count(response_mask, student_logits, num_valid_tokens)
    w = broadcast_weights(weights, valid)

    # [N, k] / [N, V] rows of the valid positions only.
    lt = topk_logprobs[valid].float()
    log_q = torch.log_softmax(student_logits[valid].float(), dim=-1).gather(-1, topk_ids[valid].long())
    if renormalize:
        log_p = lt - torch.logsumexp(lt, dim=-1, keepdim=True)
        p = log_p.exp()
        # Teacher ids with probability 0 (lt = −inf) contribute 0, not 0·(−inf) = NaN.
        kl_valid = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)
        clamped_valid = torch.zeros_like(kl_valid, dtype=torch.bool)
    else:
        # The floor also turns a teacher's −inf into e^lp_min weight: no 0·(−inf).
        lt, log_q = lt.clamp_min(logprob_min), log_q.clamp_min(logprob_min)
        kl_raw = (lt.exp() * (lt - log_q)).sum(dim=-1)
        clamped_valid = (kl_raw < 0) | (kl_raw > kl_clamp)
        kl_valid = kl_raw.clamp(0.0, kl_clamp)
    kl = torch.zeros(valid.shape, dtype=kl_valid.dtype, device=kl_valid.device).masked_scatter(valid, kl_valid)
    loss = aggregate(w * kl, valid, n)

    lp_s, lp_old, lp_t = (masked(x, valid) for x in (student_logprobs, old_logprobs, teacher_logprobs))
    with torch.no_grad():
        clamped = torch.zeros_like(valid).masked_scatter(valid, clamped_valid)
        metrics = token_metrics(
            loss,
            valid,
            k1=_k1(lp_s, lp_t, kl_clamp, None),
            ratio=torch.exp((lp_s - lp_old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)),
            signal=w * kl,
            clamped=clamped,
        )
    return loss, metrics


def _k1_raw(lp_s: torch.Tensor, lp_t: torch.Tensor, floor: float | None) -> torch.Tensor:
    """lp_s − lp+, both floored at `floor` first when one is given (the authors: no floor)."""
    if floor is not None:
        lp_s, lp_t = lp_s.clamp_min(floor), lp_t.clamp_min(floor)
    return lp_s - lp_t


def _k1(lp_s: torch.Tensor, lp_t: torch.Tensor, kl_clamp: float, floor: float | None) -> torch.Tensor:
    """k1 = lp_s − lp+ clamped to ±kl_clamp (the authors: raw, then ±10)."""
    return _k1_raw(lp_s, lp_t, floor).clamp(-kl_clamp, kl_clamp)


def _check_mode(mode: str) -> None:
    if mode in _REFUSED_K1_MODES:
        raise ValueError(
            f"mode {mode!r} would back-propagate k1 = log p_student − log p_teacher directly, which is wrong: "
            "its gradient is ∇log p_student and does not depend on the teacher. Use 'k1_pg' (k1 as a detached "
            "policy-gradient advantage) or 'k3'."
        )
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {LOSS_MODES}")
