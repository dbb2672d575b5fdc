"""Tests for learner/losses.py: hand-computed losses and gradients, clipping, masking, aggregation, refusals.

The invariance tests run every mode with the authors' defaults and with our named alternatives (``CASES``); the
authors' formulas themselves are checked number by number in ``test_loss_parity.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses import METRIC_KEYS, gated_opd_loss

# Every mode with its defaults (the authors') and with the switches that bring back our earlier choices.
CASES = [
    pytest.param("k1_pg", {}, id="k1_pg"),
    pytest.param("k1_pg", {"dual_clip_c": 3.0, "floor_sampled_logprobs": True}, id="k1_pg-dual-floor"),
    pytest.param("k3", {}, id="k3"),
    pytest.param("k3", {"floor_sampled_logprobs": True}, id="k3-floor"),
    pytest.param("forward_kl_topk", {}, id="topk"),
    pytest.param("forward_kl_topk", {"topk_renormalize": True}, id="topk-renormalised"),
]

# Hand case, B = 2, T = 2; token (1, 1) is padding.
#   k1 = s − t = [[0.5, −1.0], [0.0, pad]];  adv = −w·k1 with w = [2, 0.5] -> [[−1, 2], [0, pad]]
HAND_STUDENT = [[-1.0, -2.0], [-0.5, -3.0]]
HAND_TEACHER = [[-1.5, -1.0], [-0.5, -2.0]]
HAND_MASK = [[1, 1], [1, 0]]
HAND_WEIGHTS = [2.0, 0.5]


def _student(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def _random_batch(seed: int, B: int = 6, T: int = 5, V: int = 11, k: int = 4, token_weights: bool = False):
    """Random inputs for every mode; ratios near 1 so both PPO branches occur, masks with an all-masked row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(B * T)]).view(B, T, k)
    student = torch.log_softmax(logits, -1).gather(-1, ids[..., :1]).squeeze(-1)
    old = student + 0.3 * torch.randn(B, T, generator=g)
    teacher = student + torch.randn(B, T, generator=g)
    topk_logprobs = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).gather(-1, ids)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    weights = 2 * torch.rand((B, T) if token_weights else (B,), generator=g)
    return {
        "logits": logits,
        "student": student,
        "old": old,
        "teacher": teacher,
        "mask": mask,
        "weights": weights,
        "topk": (ids, topk_logprobs),
    }


def _run(batch, mode, rows=slice(None), **kwargs):
    """Loss and gradient (w.r.t. the leaf that carries it for ``mode``) on batch[rows]."""
    logits = batch["logits"][rows].clone().requires_grad_(True)
    student = batch["student"][rows].clone().requires_grad_(True)
    extra = {}
    if mode == "forward_kl_topk":
        extra = {"teacher_topk": tuple(x[rows] for x in batch["topk"]), "student_logits": logits}
    w = batch["weights"][rows]
    loss, metrics = gated_opd_loss(
        student, batch["old"][rows], batch["teacher"][rows], batch["mask"][rows], w, mode=mode, **extra, **kwargs
    )
    loss.backward()
    leaf = logits if mode == "forward_kl_topk" else student
    return loss, leaf.grad, metrics


def test_k1_pg_hand_case_at_ratio_one():
    s = _student(HAND_STUDENT)
    loss, m = gated_opd_loss(
        s, s.detach(), torch.tensor(HAND_TEACHER), torch.tensor(HAND_MASK), torch.tensor(HAND_WEIGHTS)
    )
    # r = 1: L = −Σ adv / N = −(−1 + 2 + 0) / 3.
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(-1 / 3, abs=1e-7)
    loss.backward()
    # dL/ds_t = −adv_t / N at r = 1; padding gets 0.
    torch.testing.assert_close(s.grad, torch.tensor([[1 / 3, -2 / 3], [0.0, 0.0]]), rtol=0, atol=1e-7)
    assert set(m) == set(METRIC_KEYS)
    assert m["k1_mean"] == pytest.approx((0.5 - 1.0 + 0.0) / 3, abs=1e-7)
    assert m["clip_frac"] == 0.0
    assert m["ratio_mean"] == 1.0 and m["ratio_max"] == 1.0
    assert m["weighted_abs_signal"] == pytest.approx((1.0 + 2.0 + 0.0) / 3, abs=1e-7)  # |2·0.5|, |2·−1|, |0.5·0|
    assert m["loss"] == pytest.approx(-1 / 3, abs=1e-7)


def test_k1_pg_inside_clip_range_is_minus_ratio_times_advantage():
    s = _student(HAND_STUDENT)
    log_r = torch.tensor([[0.1, -0.1], [0.05, 7.0]])  # padding ratio e^7 would be clipped if it were read
    loss, m = gated_opd_loss(
        s, s.detach() - log_r, torch.tensor(HAND_TEACHER), torch.tensor(HAND_MASK), torch.tensor(HAND_WEIGHTS)
    )
    # adv = [[−1, 2], [0]]: L = −(e^0.1·(−1) + e^−0.1·2 + e^0.05·0) / 3, exactly the unclipped surrogate.
    assert loss.item() == pytest.approx((math.exp(0.1) - 2 * math.exp(-0.1)) / 3, abs=1e-7)
    loss.backward()
    expected = torch.tensor([[math.exp(0.1) / 3, -2 * math.exp(-0.1) / 3], [0.0, 0.0]])
    torch.testing.assert_close(s.grad, expected, rtol=0, atol=1e-7)
    assert m["clip_frac"] == 0.0
    assert m["ratio_max"] == pytest.approx(math.exp(0.1), abs=1e-6)


# One trajectory, four tokens, w = 1: adv = t − s = [0.5, 0.5, −1, −1]; ratios r = [1.5, 0.5, 0.5, 1.5].
CLIP_STUDENT = [[-1.0, -1.0, -1.0, -1.0]]
CLIP_TEACHER = [[-0.5, -0.5, -2.0, -2.0]]
CLIP_RATIOS = [1.5, 0.5, 0.5, 1.5]


def _clip_case(**kwargs):
    s = _student(CLIP_STUDENT)
    old = s.detach() - torch.log(torch.tensor([CLIP_RATIOS]))
    loss, m = gated_opd_loss(s, old, torch.tensor(CLIP_TEACHER), torch.ones(1, 4), torch.ones(1), **kwargs)
    loss.backward()
    return loss, s.grad, m


def test_k1_pg_clips_ratio_outside_range():
    loss, grad, m = _clip_case()
    # tok0: adv>0, r=1.5>1.2 -> clipped: −1.2·0.5      tok1: adv>0, r=0.5 -> unclipped: −0.5·0.5
    # tok2: adv<0, r=0.5<0.8 -> clipped: 0.8·1          tok3: adv<0, r=1.5 -> unclipped: 1.5·1
    assert loss.item() == pytest.approx((-0.6 - 0.25 + 0.8 + 1.5) / 4, abs=1e-6)
    assert m["clip_frac"] == 0.5
    # Clipped tokens get no gradient; unclipped ones get −adv·r / N (dr/ds = r).
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.5 * 0.5 / 4, 0.0, 1.5 / 4]]), rtol=0, atol=1e-6)
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["ratio_max"] == pytest.approx(1.5, abs=1e-6)


def test_k1_pg_clip_range_is_asymmetric():
    # [0.8, 1.6]: only tok2 (adv<0, r=0.5) is clipped.
    loss, _, m = _clip_case(clip_low=0.2, clip_high=0.6)
    assert m["clip_frac"] == 0.25
    assert loss.item() == pytest.approx((-0.75 - 0.25 + 0.8 + 1.5) / 4, abs=1e-6)
    # [0.4, 1.6]: nothing clipped, so L = −Σ r·adv / N.
    loss, _, m = _clip_case(clip_low=0.6, clip_high=0.6)
    assert m["clip_frac"] == 0.0
    assert loss.item() == pytest.approx(-(0.75 + 0.25 - 0.5 - 1.5) / 4, abs=1e-6)


def test_k3_hand_case():
    s = _student([[-1.0, -2.0, -0.5]])
    t = torch.tensor([[-1.0, -1.0, -1.5]])
    loss, m = gated_opd_loss(s, s.detach(), t, torch.ones(1, 3), torch.tensor([2.0]), mode="k3")
    # d = t − s = [0, 1, −1]; k3 = e^d − d − 1 = [0, e − 2, e^−1]; L = 2·Σ k3 / 3.
    k3 = [0.0, math.e - 2, math.exp(-1)]
    assert loss.item() == pytest.approx(2 * sum(k3) / 3, abs=1e-6)
    loss.backward()
    # ∂k3/∂s = 1 − e^d.
    expected = torch.tensor([[0.0, 2 * (1 - math.e) / 3, 2 * (1 - math.exp(-1)) / 3]])
    torch.testing.assert_close(s.grad, expected, rtol=0, atol=1e-6)
    assert m["weighted_abs_signal"] == pytest.approx(2 * sum(k3) / 3, abs=1e-6)
    assert m["k1_mean"] == pytest.approx((0 - 1 + 1) / 3, abs=1e-7)
    assert m["clip_frac"] == 0.0


def _topk_hand_inputs():
    # Renormalised top-k (topk_renormalize=True, ours).
    # Position 0: student uniform over V = 4; teacher top-2 ids [0, 1] with probs [0.3, 0.1] -> renormalised
    #   [0.75, 0.25]; KL = 0.75·ln(0.75/0.25) + 0.25·ln(0.25/0.25) = 0.75·ln 3.
    # Position 1: student q = [0.5, 0.25, 0.125, 0.125]; teacher ids [2, 0] with probs [0.2, 0.2] -> [0.5, 0.5];
    #   KL = 0.5·ln(0.5/0.125) + 0.5·ln(0.5/0.5) = ln 2.
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(4), math.log(2), 0.0, 0.0]]], requires_grad=True)
    ids = torch.tensor([[[0, 1], [2, 0]]])
    topk_lp = torch.log(torch.tensor([[[0.3, 0.1], [0.2, 0.2]]]))
    zeros = torch.zeros(1, 2)
    return logits, ids, topk_lp, zeros


def test_forward_kl_topk_renormalised_hand_case():
    logits, ids, topk_lp, zeros = _topk_hand_inputs()
    loss, m = gated_opd_loss(
        zeros, zeros, zeros, torch.ones(1, 2), torch.tensor([1.0]),
        mode="forward_kl_topk", teacher_topk=(ids, topk_lp), student_logits=logits, topk_renormalize=True,
    )  # fmt: skip
    assert loss.item() == pytest.approx((0.75 * math.log(3) + math.log(2)) / 2, abs=1e-6)
    loss.backward()
    # ∂KL/∂logit = q − p (p zero outside the top-k), divided by N = 2.
    expected = torch.tensor([[[-0.5, 0.0, 0.25, 0.25], [0.0, 0.25, -0.375, 0.125]]]) / 2
    torch.testing.assert_close(logits.grad, expected, rtol=0, atol=1e-6)
    assert m["weighted_abs_signal"] == pytest.approx(loss.item(), abs=1e-6)


def test_forward_kl_topk_renormalised_ignores_zero_probability_teacher_ids():
    logits, _, _, zeros = _topk_hand_inputs()
    ids = torch.tensor([[[0, 1, 3], [2, 0, 1]]])
    topk_lp = torch.log(torch.tensor([[[0.3, 0.1, 0.0], [0.2, 0.2, 0.0]]]))  # log 0 = −inf
    loss, _ = gated_opd_loss(
        zeros, zeros, zeros, torch.ones(1, 2), torch.tensor([1.0]),
        mode="forward_kl_topk", teacher_topk=(ids, topk_lp), student_logits=logits, topk_renormalize=True,
    )  # fmt: skip
    assert loss.item() == pytest.approx((0.75 * math.log(3) + math.log(2)) / 2, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_forward_kl_topk_needs_teacher_topk_and_student_logits():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="missing: teacher_topk, student_logits"):
        gated_opd_loss(x, x, x, torch.ones(1, 2), torch.ones(1), mode="forward_kl_topk")
    with pytest.raises(ValueError, match="missing: student_logits"):
        gated_opd_loss(
            x, x, x, torch.ones(1, 2), torch.ones(1),
            mode="forward_kl_topk", teacher_topk=(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 3)),
        )  # fmt: skip


@pytest.mark.parametrize("mode", ["k1", "k1_supervised"])
def test_backpropagating_k1_is_refused(mode):
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"does not depend on the teacher\. Use 'k1_pg'.*or 'k3'"):
        gated_opd_loss(x, x, x, torch.ones(1, 2), torch.ones(1), mode=mode)


def test_unknown_mode_lists_the_modes():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"unknown mode 'kl'; choose one of \('k1_pg', 'k3', 'forward_kl_topk'\)"):
        gated_opd_loss(x, x, x, torch.ones(1, 2), torch.ones(1), mode="kl")


@pytest.mark.parametrize(("mode", "opts"), CASES)
@pytest.mark.parametrize("token_weights", [False, True])
def test_zero_weight_gives_exactly_zero_gradient(mode, opts, token_weights):
    batch = _random_batch(0, token_weights=token_weights)
    batch["mask"][:] = True
    if token_weights:
        batch["weights"][1, :] = 0.0
        batch["weights"][2, 3] = 0.0
    else:
        batch["weights"][1] = 0.0
    _, grad, _ = _run(batch, mode, **opts)
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert grad[2].abs().sum() > 0 and grad[3].abs().sum() > 0  # the others do learn
    if token_weights:
        assert torch.equal(grad[2, 3], torch.zeros_like(grad[2, 3]))
        assert grad[2, 2].abs().sum() > 0


@pytest.mark.parametrize(("mode", "opts"), CASES)
@pytest.mark.parametrize("token_weights", [False, True])
def test_micro_batches_with_global_token_count_sum_to_the_full_batch(mode, opts, token_weights):
    batch = _random_batch(1, token_weights=token_weights)
    n_total = int(batch["mask"].sum())
    full_loss, full_grad, _ = _run(batch, mode, **opts)
    loss_a, grad_a, _ = _run(batch, mode, rows=slice(0, 2), num_valid_tokens=n_total, **opts)
    loss_b, grad_b, _ = _run(batch, mode, rows=slice(2, None), num_valid_tokens=torch.tensor(n_total), **opts)
    assert (loss_a + loss_b).item() == pytest.approx(full_loss.item(), abs=1e-6)
    torch.testing.assert_close(torch.cat([grad_a, grad_b]), full_grad, rtol=0, atol=1e-7)
    # Without the global count each micro-batch would be its own token-mean, which differs.
    loss_a_local, _, _ = _run(batch, mode, rows=slice(0, 2), **opts)
    assert loss_a_local.item() != pytest.approx(loss_a.item(), abs=1e-6)


def test_num_valid_tokens_below_local_count_is_refused():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="num_valid_tokens=2 is smaller than this call's 3 valid tokens"):
        gated_opd_loss(x, x, x, torch.ones(1, 3), torch.ones(1), num_valid_tokens=2)


@pytest.mark.parametrize(("mode", "opts"), CASES)
def test_all_masked_batch_gives_zero_loss_that_still_backpropagates(mode, opts):
    batch = _random_batch(2)
    batch["mask"][:] = False
    loss, grad, m = _run(batch, mode, **opts)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    assert set(m) == set(METRIC_KEYS) and all(v == 0.0 for v in m.values())


@pytest.mark.parametrize(("mode", "opts"), CASES)
@pytest.mark.parametrize("garbage", [1e30, -1e30, float("inf"), float("nan")])
def test_masked_positions_are_never_read(mode, opts, garbage):
    batch = _random_batch(3, token_weights=True)
    clean_loss, clean_grad, clean_m = _run(batch, mode, **opts)
    pad = ~batch["mask"]
    for key in ("student", "old", "teacher", "weights"):
        batch[key][pad] = garbage
    batch["logits"][pad] = garbage
    batch["topk"][0][pad] = 10_000  # out-of-vocabulary ids at padding
    batch["topk"][1][pad] = garbage
    loss, grad, m = _run(batch, mode, **opts)
    assert loss.item() == clean_loss.item()
    torch.testing.assert_close(grad, clean_grad, rtol=0, atol=0)
    assert torch.equal(grad[pad], torch.zeros_like(grad[pad]))
    assert m == clean_m


@pytest.mark.parametrize(("mode", "opts"), CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_in_float32_loss_out(mode, opts, dtype):
    batch = _random_batch(4)
    for key in ("student", "old", "teacher", "logits"):
        batch[key] = batch[key].to(dtype)
    loss, grad, _ = _run(batch, mode, **opts)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # Same rounded values, float32 throughout.
    for key in ("student", "old", "teacher", "logits"):
        batch[key] = batch[key].float()
    ref_loss, _, _ = _run(batch, mode, **opts)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("mode", "opts"), CASES)
def test_cuda_matches_cpu(mode, opts):
    batch = _random_batch(5, token_weights=True)
    cpu_loss, cpu_grad, cpu_m = _run(batch, mode, **opts)
    gpu_batch = {k: (tuple(x.cuda() for x in v) if k == "topk" else v.cuda()) for k, v in batch.items()}
    gpu_loss, gpu_grad, gpu_m = _run(gpu_batch, mode, **opts)
    assert gpu_loss.device.type == "cuda" and gpu_loss.dtype == torch.float32
    assert gpu_loss.item() == pytest.approx(cpu_loss.item(), abs=1e-5)
    torch.testing.assert_close(gpu_grad.cpu(), cpu_grad, rtol=1e-5, atol=1e-6)
    assert gpu_m == pytest.approx(cpu_m, abs=1e-5)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"old_logprobs": torch.zeros(2, 4)}, "old_logprobs shape"),
        ({"teacher_logprobs": torch.zeros(3, 3)}, "teacher_logprobs shape"),
        ({"response_mask": torch.ones(2)}, "response_mask shape"),
        ({"weights": torch.ones(3)}, r"weights must be \[B\]=\(2,\)"),
        ({"weights": torch.ones(2, 3, 1)}, "weights must be"),
        ({"student_logprobs": torch.zeros(2, 3, 1)}, "student_logprobs must be"),
    ],
)
def test_bad_shapes_raise_naming_the_argument(overrides, match):
    args = {
        "student_logprobs": torch.zeros(2, 3),
        "old_logprobs": torch.zeros(2, 3),
        "teacher_logprobs": torch.zeros(2, 3),
        "response_mask": torch.ones(2, 3),
        "weights": torch.ones(2),
    }
    args.update(overrides)
    with pytest.raises(ValueError, match=match):
        gated_opd_loss(**args)
