"""The authors' loss formulas (vzero-method.md, "The authors' recipe, point by point"), number by number.

Each case puts tokens on both sides of a clamp and compares the loss and its gradient with the formula evaluated by
hand or in float64 NumPy: k1 taken raw then clamped to ±10, PPO with the optional dual clip (c = 3), k3 clamped on its
VALUE at 10, the top-k forward KL unnormalised with both sides floored at −10 and the per-token value clamped to
[0, 10]; plus the switches that bring back our earlier choices (the log-prob floor on k1 / k3).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learner.losses import gated_opd_loss
from vzero.config import LearnerConfig, LossConfig


def _student(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def test_the_defaults_are_the_authors_values():
    loss, learner = LossConfig(), LearnerConfig()
    assert (loss.mode, loss.clip_low, loss.clip_high, loss.dual_clip_c) == ("k1_pg", 0.2, 0.2, None)
    assert (loss.kl_clamp, loss.logprob_min) == (10.0, -10.0)
    assert not loss.floor_sampled_logprobs and not loss.topk_renormalize
    assert loss.old_logprobs == "auto" and learner.mini_batches_per_step == 2


@pytest.mark.parametrize(
    ("student", "teacher", "kwargs", "expected_k1"),
    [
        (-1.0, -5.0, {}, 4.0),
        (-1.0, -30.0, {}, 10.0),  # raw 29, clamped to +10 (the authors: no log-prob floor on k1)
        (-30.0, -1.0, {}, -10.0),  # raw −29, clamped to −10
        (-15.0, -25.0, {}, 10.0),  # both below −10: raw 10 still counts
        (-1.0, -30.0, {"kl_clamp": 5.0}, 5.0),
        # floor_sampled_logprobs (ours): both sides floored at logprob_min first
        (-1.0, -30.0, {"floor_sampled_logprobs": True}, 9.0),
        (-30.0, -1.0, {"floor_sampled_logprobs": True}, -9.0),
        (-15.0, -25.0, {"floor_sampled_logprobs": True}, 0.0),  # both floored: treated as agreement
        (-1.0, -30.0, {"floor_sampled_logprobs": True, "logprob_min": -100.0}, 10.0),
    ],
)
def test_k1_is_taken_raw_then_clamped(student, teacher, kwargs, expected_k1):
    s = _student([[student]])
    loss, m = gated_opd_loss(s, s.detach(), torch.tensor([[teacher]]), torch.ones(1, 1), torch.ones(1), **kwargs)
    # r = 1, w = 1, one token: L = −adv = k1, and dL/ds = −adv = k1 through the raw (never floored) ratio.
    assert loss.item() == pytest.approx(expected_k1, abs=1e-6)
    assert m["k1_mean"] == pytest.approx(expected_k1, abs=1e-6)
    loss.backward()
    assert s.grad.item() == pytest.approx(expected_k1, abs=1e-6)


# B = 2, T = 4, token (1, 3) padding. Advantages of both signs, ratios inside, below and above the clip range, and
# two tokens (adv < 0, r = e^1.5 and e^1.2 > 3) where the dual clip caps the loss.
K1_S = [[-0.5, -2.0, -12.0, -1.0], [-3.0, -0.1, -25.0, 0.0]]
K1_T = [[-1.5, -0.5, -1.0, -20.0], [-3.5, -4.0, -2.0, 0.0]]
K1_LOG_R = [[0.5, -0.4, 1.5, 1.5], [-0.1, 1.2, 0.0, 9.0]]
K1_MASK = [[1, 1, 1, 1], [1, 1, 1, 0]]
K1_W = [1.5, 0.5]


def _k1_pg_numpy(c: float | None):
    """The authors' k1-PG in float64: (loss, dL/ds, clip_frac, dual_clip_frac)."""
    s, t, log_r, mask = (np.array(x, dtype=np.float64) for x in (K1_S, K1_T, K1_LOG_R, K1_MASK))
    w = np.array(K1_W)[:, None]
    adv = -w * np.clip(s - t, -10, 10)
    r = np.exp(log_r)
    pg1, pg2 = -adv * r, -adv * np.clip(r, 0.8, 1.2)
    per = np.maximum(pg1, pg2)
    grad = np.where(pg1 >= pg2, -adv * r, 0.0)  # the unclipped branch carries d(−adv·r)/ds = −adv·r
    dual = np.zeros_like(per, dtype=bool)
    if c is not None:
        dual = (adv < 0) & (per > -adv * c)
        per = np.where(dual, -adv * c, per)
        grad = np.where(dual, 0.0, grad)
    n = mask.sum()
    valid = mask > 0
    return (per * mask).sum() / n, grad * mask / n, (pg2 > pg1)[valid].mean(), dual[valid].mean()


@pytest.mark.parametrize("c", [None, 3.0])
def test_k1_pg_matches_numpy_with_and_without_dual_clip(c):
    s = _student(K1_S)
    old = s.detach() - torch.tensor(K1_LOG_R)
    loss, m = gated_opd_loss(
        s, old, torch.tensor(K1_T), torch.tensor(K1_MASK), torch.tensor(K1_W), dual_clip_c=c
    )  # fmt: skip
    loss.backward()
    ref_loss, ref_grad, clip_frac, dual_frac = _k1_pg_numpy(c)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-5)
    torch.testing.assert_close(s.grad, torch.tensor(ref_grad, dtype=torch.float32), rtol=0, atol=1e-6)
    assert m["clip_frac"] == pytest.approx(clip_frac) and m["dual_clip_frac"] == pytest.approx(dual_frac)
    assert (dual_frac > 0) == (c is not None)


def test_dual_clip_caps_negative_advantages_only():
    # One trajectory, w = 1: adv = [−1, −1, −1, +1], r = [0.5, 2, 5, 5], c = 3.
    #   tok0: max(0.5, 0.8) = 0.8 (clipped)   tok1: max(2, 1.2) = 2   tok2: min(max(5, 1.2), 3) = 3 (dual)
    #   tok3: max(−5, −1.2) = −1.2 (clipped; a positive advantage is never dual-clipped)
    s = _student([[-1.0, -1.0, -1.0, -2.0]])
    old = s.detach() - torch.log(torch.tensor([[0.5, 2.0, 5.0, 5.0]]))
    t = torch.tensor([[-2.0, -2.0, -2.0, -1.0]])
    loss, m = gated_opd_loss(s, old, t, torch.ones(1, 4), torch.ones(1), dual_clip_c=3.0)
    assert loss.item() == pytest.approx((0.8 + 2.0 + 3.0 - 1.2) / 4, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(s.grad, torch.tensor([[0.0, 2.0 / 4, 0.0, 0.0]]), rtol=0, atol=1e-6)
    assert m["dual_clip_frac"] == 0.25 and m["clip_frac"] == 0.5
    loss_off, _ = gated_opd_loss(s, old, t, torch.ones(1, 4), torch.ones(1))
    assert loss_off.item() == pytest.approx((0.8 + 2.0 + 5.0 - 1.2) / 4, abs=1e-6)
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        gated_opd_loss(s, old, t, torch.ones(1, 4), torch.ones(1), dual_clip_c=1.0)


# d = lp+ − lp_s = [20, 3, 2, −12, −5]: k3 = e^d − d − 1 = [4.9e8, 16.1, 4.39, 11.000006, 4.0067].
K3_S = [[-20.0, -4.0, -3.0, -1.0, -0.5]]
K3_T = [[0.0, -1.0, -1.0, -13.0, -5.5]]


def test_one_token_k3_loss_is_at_most_the_clamp():
    # Before #12 the log-ratio was clamped (and lp_s floored at −10): d = 10, one token's loss e^10 − 11 ≈ 22015.
    s = _student([[-20.0]])
    loss, m = gated_opd_loss(s, s.detach(), torch.tensor([[0.0]]), torch.ones(1, 1), torch.ones(1), mode="k3")
    assert loss.item() == pytest.approx(10.0, abs=1e-6)
    loss.backward()
    assert s.grad.item() == 0.0 and m["clamp_frac"] == 1.0


@pytest.mark.parametrize("floor", [False, True])
def test_k3_clamps_its_value_at_ten_and_drops_those_gradients(floor):
    s = _student(K3_S)
    loss, m = gated_opd_loss(
        s, s.detach(), torch.tensor(K3_T), torch.ones(1, 5), torch.tensor([2.0]), mode="k3",
        floor_sampled_logprobs=floor,
    )  # fmt: skip
    loss.backward()
    lp_s, lp_t = np.array(K3_S[0]), np.array(K3_T[0])
    if floor:  # ours: both sides floored at −10 first; a floored student token has no gradient either way
        lp_s, lp_t = np.maximum(lp_s, -10), np.maximum(lp_t, -10)
    d = lp_t - lp_s
    k3 = np.exp(d) - d - 1
    kept = k3 <= 10
    grad = np.where(kept & (np.array(K3_S[0]) >= (-10 if floor else -np.inf)), 1 - np.exp(d), 0.0)
    assert loss.item() == pytest.approx(2 * np.minimum(k3, 10).sum() / 5, rel=1e-6)
    torch.testing.assert_close(s.grad, torch.tensor(2 * grad[None] / 5, dtype=torch.float32), rtol=1e-6, atol=1e-7)
    assert m["clamp_frac"] == pytest.approx((~kept).mean())


def _topk_case():
    """Four positions, V = 4, k = 2, w = 1 (the authors' unnormalised top-k, floors at −10)."""
    z = 7 + math.exp(-30)
    logits = torch.tensor(
        [[[0.0] * 4, [math.log(4), math.log(2), 0.0, -30.0], [0.0] * 4, [0.0] * 4]], requires_grad=True
    )
    ids = torch.tensor([[[0, 1], [0, 3], [0, 1], [2, 1]]])
    teacher_p = np.array([[0.6, 0.3], [0.5, 0.2], [0.3, 0.1], [0.7, 0.0]])  # the last: log 0 = −inf, floored to −10
    q = np.array([[0.25] * 4, [4 / z, 2 / z, 1 / z, math.exp(-30) / z], [0.25] * 4, [0.25] * 4])
    with np.errstate(divide="ignore"):
        lt = np.maximum(np.log(teacher_p), -10)
    lq = np.maximum(np.log(q[np.arange(4)[:, None], ids[0].numpy()]), -10)
    kl_raw = (np.exp(lt) * (lt - lq)).sum(-1)  # [0.580, 1.611, −0.037 (clamped to 0), 0.721]
    # ∂KL/∂logit_v = Σ_j p_j (q_v − δ_jv) over the ids whose student log-prob is above the floor.
    grad = np.zeros((4, 4))
    for pos in range(4):
        for j, v in enumerate(ids[0, pos].tolist()):
            if np.log(q[pos, v]) > -10:
                grad[pos] += np.exp(lt[pos, j]) * (q[pos] - np.eye(4)[v])
    topk_lp = torch.log(torch.tensor(teacher_p[None], dtype=torch.float32))
    return logits, ids, topk_lp, kl_raw, grad


@pytest.mark.parametrize("kl_clamp", [10.0, 1.0])
def test_forward_kl_topk_unnormalised_floored_and_clamped(kl_clamp):
    logits, ids, topk_lp, kl_raw, grad = _topk_case()
    assert kl_raw[2] < 0 < kl_raw[0] < 1.0 < kl_raw[1] < 10.0
    zeros = torch.zeros(1, 4)
    loss, m = gated_opd_loss(
        zeros, zeros, zeros, torch.ones(1, 4), torch.tensor([1.0]), mode="forward_kl_topk",
        teacher_topk=(ids, topk_lp), student_logits=logits, kl_clamp=kl_clamp,
    )  # fmt: skip
    loss.backward()
    kept = (kl_raw >= 0) & (kl_raw <= kl_clamp)  # outside [0, kl_clamp]: clamped, no gradient
    assert loss.item() == pytest.approx(np.clip(kl_raw, 0, kl_clamp).sum() / 4, rel=1e-6)
    expected = torch.tensor(np.where(kept[:, None], grad, 0.0)[None] / 4, dtype=torch.float32)
    torch.testing.assert_close(logits.grad, expected, rtol=0, atol=1e-6)
    assert m["clamp_frac"] == pytest.approx((~kept).mean())
    # The same inputs renormalised (ours): position 2 becomes 0.75·ln 3 > 0 instead of being clamped away.
    loss_renorm, _ = gated_opd_loss(
        zeros, zeros, zeros, torch.ones(1, 4), torch.tensor([1.0]), mode="forward_kl_topk",
        teacher_topk=(ids, topk_lp), student_logits=logits.detach(), topk_renormalize=True,
    )  # fmt: skip
    assert loss_renorm.item() != pytest.approx(loss.item(), abs=1e-3)
