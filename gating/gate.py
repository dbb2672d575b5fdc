"""Contrastive evidence gate: teacher log-probs under two views in, per-trajectory (or per-token) weights out.

Contract: one pure tensor function, ``evidence_weights``. It knows nothing about models, Ray, prompts or images:
it gets the teacher's log-prob of every sampled response token under the POSITIVE view (the evidence crop) and the
NEGATIVE view (an irrelevant crop, or the downsampled evidence), a response mask, and which trajectories share a
prompt, and returns detached weights plus a dict of python-float diagnostics for logging.

``evidence_gate`` returns the weights with the per-element quantities behind the diagnostics (``GateTerms``), and
``gate_diagnostics`` turns any number of them into one dict: several gating actors each gate their own prompts, and
the step's statistics are computed once over all of their trajectories (a mean of per-actor minima is no minimum).
``gate_metrics`` names them for the metrics log (``gate/*``, or ``gate_would/*`` when the gate is off).

The equations are those of the method notes (``vzero-method.md``, "Contrastive evidence gate"), numbered as there:

    1. delta_t = lp+_t − lp-_t
    2. s_t     = relu(delta_t) − γ·relu(−delta_t)
    3. S_i     = Σ_t m_t s_t / max(Σ_t m_t, eps)
    4. A_i     = (S_i − mean_g S) / (std_g S + eps)     population std; a group of size 1 gets A_i = 0
    5. w_i     = clamp(1 + α·A_i, w_min, w_max)         detached

``level="sequence"`` is the authors' gate (one weight per trajectory). ``level="token"`` is ours: it skips step 3
and normalises each token score against its group's pooled valid token scores (see ``evidence_weights``).

``shuffle_within_groups`` is a control experiment, not part of the method: the same sequence weights permuted within
each group, so their distribution stays and their link to the evidence goes (config ``gate.shuffle_control``).

Run the tests with ``.venv/bin/pytest tests/gating/test_gate.py``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from vzero.runtime import derive_seed

GATE_LEVELS = ("sequence", "token")

DIAGNOSTIC_KEYS = (
    "score_mean",
    "score_std",
    "adv_mean",
    "adv_std",
    "weight_mean",
    "weight_min",
    "weight_max",
    "frac_at_w_min",
    "delta_mean",
    "frac_delta_pos",
)
# The diagnostics that describe the weights themselves (the rest describe the teacher's contrast).
WEIGHT_KEYS = ("weight_mean", "weight_min", "weight_max", "frac_at_w_min")


@dataclass
class GateTerms:
    """The quantities the diagnostics are computed from, flat 1-D float64 CPU tensors: per trajectory (sequence
    level) or per valid token (token level) for score S / s_t, advantage A and weight w; per valid token for delta."""

    score: torch.Tensor
    adv: torch.Tensor
    weight: torch.Tensor
    delta: torch.Tensor


def gate_diagnostics(terms: GateTerms | Sequence[GateTerms], *, w_min: float) -> dict[str, float]:
    """``DIAGNOSTIC_KEYS`` over every element of every part: the statistics of the union, never a mean of parts."""
    parts = [terms] if isinstance(terms, GateTerms) else list(terms)

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name).double().reshape(-1) for p in parts]) if parts else torch.zeros(0)

    score, adv, weight, delta = cat("score"), cat("adv"), cat("weight"), cat("delta")
    return {
        "score_mean": _mean(score),
        "score_std": _std(score),
        "adv_mean": _mean(adv),
        "adv_std": _std(adv),
        "weight_mean": _mean(weight),
        "weight_min": float(weight.min().item()) if weight.numel() else 0.0,
        "weight_max": float(weight.max().item()) if weight.numel() else 0.0,
        # Clamp returns w_min exactly, so equality in float64 (before the float32 cast) is the right test.
        "frac_at_w_min": _mean((weight <= w_min).double()),
        "delta_mean": _mean(delta),
        "frac_delta_pos": _mean((delta > 0).double()),
    }


def gate_metrics(terms: Sequence[GateTerms], *, w_min: float, enabled: bool) -> dict[str, float]:
    """A step's logged gate statistics, over all its trajectories (every gating actor's terms pooled).

    `gate/weight_*` always describe the weights the loss applied. With the gate off those are all 1, and what the
    gate would have said (the statistics of the weights it computed, and of the teacher's contrast) is logged as
    `gate_would/*`; with the gate on every statistic is under `gate/*`."""
    diag = gate_diagnostics(terms, w_min=w_min)
    if enabled:
        return {f"gate/{k}": v for k, v in diag.items()}
    ones = [GateTerms(t.score[:0], t.adv[:0], torch.ones_like(t.weight), t.delta[:0]) for t in terms]
    applied = gate_diagnostics(ones, w_min=w_min)
    return {**{f"gate/{k}": applied[k] for k in WEIGHT_KEYS}, **{f"gate_would/{k}": v for k, v in diag.items()}}


def evidence_weights(
    pos_logprobs: torch.Tensor,
    neg_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: Sequence[Hashable] | torch.Tensor,
    *,
    gamma: float = 1.0,
    alpha: float = 0.5,
    w_min: float = 0.0,
    w_max: float = 2.0,
    eps: float = 1e-6,
    level: str = "sequence",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Gate weights from the teacher's positive-vs-negative view contrast (vzero-method.md steps 1–5).

    Args:
        pos_logprobs: [B, T] teacher log-prob of each sampled response token under the positive view (lp+).
        neg_logprobs: [B, T] the same under the negative view (lp-).
        response_mask: [B, T] bool or float; nonzero marks a real response token (m_t). Values at masked
            positions of the log-prob tensors are never read, so padding may hold any garbage (inf and NaN too).
        group_ids: length-B 1-D tensor or sequence of hashables (ints, strings); equal ids = same prompt (uid).
        gamma: γ, how hard negative evidence (delta < 0) is penalised relative to positive evidence.
        alpha: α, how far one group-std of score moves the weight away from 1.
        w_min, w_max: clamp range of the weights.
        eps: guards the token-count division (step 3) and the std division (step 4).
        level: "sequence" (the authors' gate) returns [B]; "token" (ours) returns [B, T].

    Returns:
        ``(weights, diagnostics)``. ``weights`` is float32, detached, on the inputs' device. ``diagnostics``
        holds exactly ``DIAGNOSTIC_KEYS`` as python floats (0.0 when there is nothing to average, never NaN):
        score/adv/weight statistics over trajectories (sequence level) or over valid tokens (token level), std
        being the population std; delta statistics always over valid tokens.

    Sequence level: a trajectory with no valid token scores S_i = 0 (step 3's max(·, eps)) and still counts in
    its group's mean and std, exactly as the formula reads.

    Token level (beyond the paper): step 3 is skipped and step 4 is applied per token, A_t = (s_t − mean_g s) /
    (std_g s + eps), where mean_g and std_g run over ALL valid tokens of ALL trajectories of the group pooled
    together. So a lone trajectory (group of size 1) still gets token-level contrast over its own tokens, while a
    group with at most one valid token gets A_t = 0. Masked positions get weight 0, so the loss can multiply
    by the weights without re-masking.

    Everything is computed in float64 and cast to float32 at the end: step 4 divides by a group std that can be
    ~1e-6 when scores nearly agree, and float32 rounding of |S| ≈ 5 (~5e-7) would then move A by ~0.5.
    """
    w, terms = evidence_gate(
        pos_logprobs,
        neg_logprobs,
        response_mask,
        group_ids,
        gamma=gamma,
        alpha=alpha,
        w_min=w_min,
        w_max=w_max,
        eps=eps,
        level=level,
    )
    return w, gate_diagnostics(terms, w_min=w_min)


def evidence_gate(
    pos_logprobs: torch.Tensor,
    neg_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: Sequence[Hashable] | torch.Tensor,
    *,
    gamma: float = 1.0,
    alpha: float = 0.5,
    w_min: float = 0.0,
    w_max: float = 2.0,
    eps: float = 1e-6,
    level: str = "sequence",
) -> tuple[torch.Tensor, GateTerms]:
    """``evidence_weights`` with the per-element ``GateTerms`` instead of the diagnostics dict (same arguments)."""
    _check_inputs(pos_logprobs, neg_logprobs, response_mask, group_ids, w_min=w_min, w_max=w_max, eps=eps, level=level)
    device = pos_logprobs.device
    with torch.no_grad():
        valid = response_mask.to(device) != 0  # [B, T]; float masks count any nonzero as a real token
        g = _group_index(group_ids, device)  # [B] contiguous group index 0..G-1
        num_groups = int(g.max().item()) + 1 if g.numel() else 0

        # Step 1. torch.where (not multiplication by the mask) so inf/NaN padding never reaches a sum.
        delta = torch.where(valid, pos_logprobs.double() - neg_logprobs.double(), 0.0)
        # Step 2. Zero at masked positions because delta is zero there.
        s = torch.relu(delta) - gamma * torch.relu(-delta)

        if level == "sequence":
            # Step 3. An all-masked row divides 0 by eps and scores exactly 0.
            n_tok = valid.sum(dim=1).double()
            S = s.sum(dim=1) / n_tok.clamp_min(eps)
            # Step 4 over trajectories; every trajectory is one sample of its group.
            A = _group_standardise(S, g, torch.ones_like(S), num_groups, eps)
            # Step 5.
            w = torch.clamp(1.0 + alpha * A, w_min, w_max)
            score, adv, weight = S, A, w
        else:
            # Step 4 over tokens: every valid token is one sample of its trajectory's group.
            g_tok = g[:, None].expand_as(s).reshape(-1)
            A = _group_standardise(s.reshape(-1), g_tok, valid.reshape(-1).double(), num_groups, eps)
            A = A.view_as(s)
            # Step 5, then zero the padding so callers can multiply without re-masking.
            w = torch.where(valid, torch.clamp(1.0 + alpha * A, w_min, w_max), 0.0)
            score, adv, weight = s[valid], A[valid], w[valid]

        terms = GateTerms(*(x.detach().double().reshape(-1).cpu() for x in (score, adv, weight, delta[valid])))
    return w.float(), terms


def shuffle_within_groups(
    weights: torch.Tensor, group_ids: Sequence[Hashable] | torch.Tensor, *, seed: int
) -> torch.Tensor:
    """[B] sequence weights permuted within each group: the shuffled-gate control.

    Every group keeps exactly its multiset of weights (so mean, spread and the share at w_min are unchanged) but
    which trajectory gets which weight is random: whatever the gate knows about the evidence is removed. The
    permutation of a group depends only on (``seed``, its group id) and the order of its members, not on the other
    groups in the batch.
    """
    if weights.dim() != 1 or len(group_ids) != weights.shape[0]:
        raise ValueError(
            f"weights must be [B] with one group id each, got {tuple(weights.shape)} and {len(group_ids)} ids"
        )
    keys = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    members: dict[Hashable, list[int]] = {}
    for i, gid in enumerate(keys):
        members.setdefault(gid, []).append(i)
    out = weights.clone()
    for gid, idx in members.items():
        gen = torch.Generator().manual_seed(derive_seed(seed, "gate-shuffle", gid))
        perm = torch.randperm(len(idx), generator=gen)
        src = torch.tensor(idx, device=weights.device)
        out[src] = weights[src[perm.to(weights.device)]]
    return out


def _group_standardise(
    x: torch.Tensor, g: torch.Tensor, count: torch.Tensor, num_groups: int, eps: float
) -> torch.Tensor:
    """(x − mean_g x) / (std_g x + eps) per element, with per-group statistics over elements where count is 1.

    ``count`` is 1.0 for an element that belongs to the statistics and 0.0 for one that does not (a masked token);
    excluded elements must hold x = 0 and come back with 0. Groups with ≤ 1 counted element return 0, which is
    what the formula already gives for one element (x − mean = 0) but is made explicit here. The scatter is an
    index_add over contiguous group indices: one kernel for any number of groups, no Python loop over B.
    """
    n_g = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, g, count)
    sum_g = torch.zeros_like(n_g).index_add_(0, g, x * count)
    mean_g = sum_g / n_g.clamp_min(1.0)
    dev = (x - mean_g[g]) * count
    var_g = torch.zeros_like(n_g).index_add_(0, g, dev * dev) / n_g.clamp_min(1.0)  # population variance
    A = dev / (var_g.sqrt()[g] + eps)
    return torch.where((n_g[g] > 1) & (count > 0), A, 0.0)


def _group_index(group_ids: Sequence[Hashable] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Map arbitrary hashable group ids to contiguous int64 indices 0..G-1 on ``device``.

    Tensor ids go through torch.unique (stays on device); other sequences are mapped by first appearance with a
    dict, the one Python loop over B, which only translates ids and does no arithmetic.
    """
    if isinstance(group_ids, torch.Tensor):
        return torch.unique(group_ids.to(device), return_inverse=True)[1].long()
    index: dict[Hashable, int] = {}
    mapped = [index.setdefault(gid, len(index)) for gid in group_ids]
    return torch.tensor(mapped, dtype=torch.long, device=device)


def _mean(x: torch.Tensor) -> float:
    return float(x.mean().item()) if x.numel() else 0.0


def _std(x: torch.Tensor) -> float:
    return float(x.std(unbiased=False).item()) if x.numel() else 0.0


def _check_inputs(
    pos_logprobs: torch.Tensor,
    neg_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: Sequence[Hashable] | torch.Tensor,
    *,
    w_min: float,
    w_max: float,
    eps: float,
    level: str,
) -> None:
    """Raise ValueError naming the offending argument; shapes are checked before any arithmetic."""
    if level not in GATE_LEVELS:
        raise ValueError(f"level must be one of {GATE_LEVELS}, got {level!r}")
    for name, t in (("pos_logprobs", pos_logprobs), ("neg_logprobs", neg_logprobs)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise ValueError(f"{name} must be a floating-point [B, T] tensor, got {_describe(t)}")
    if neg_logprobs.shape != pos_logprobs.shape:
        raise ValueError(
            f"neg_logprobs shape {tuple(neg_logprobs.shape)} != pos_logprobs shape {tuple(pos_logprobs.shape)}"
        )
    if not isinstance(response_mask, torch.Tensor) or response_mask.shape != pos_logprobs.shape:
        raise ValueError(
            f"response_mask must be a tensor of shape {tuple(pos_logprobs.shape)} (like pos_logprobs), "
            f"got {_describe(response_mask)}"
        )
    if isinstance(group_ids, torch.Tensor) and group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D, got a tensor of shape {tuple(group_ids.shape)}")
    if len(group_ids) != pos_logprobs.shape[0]:
        raise ValueError(f"group_ids has {len(group_ids)} entries but the batch has B={pos_logprobs.shape[0]}")
    if w_min > w_max:
        raise ValueError(f"w_min ({w_min}) must be <= w_max ({w_max})")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
