"""Tests for gating/gate.py: hand-computed cases, an independent loop-based NumPy re-derivation, masking, dtypes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gating.gate import DIAGNOSTIC_KEYS, GATE_LEVELS, evidence_weights

EPS = 1e-6

# Four trajectories, T = 3. Masked positions hold garbage that must never be read.
#   traj 0 (group "a"): delta = [1, 0, -1]        s(γ=2) = [1, 0, -2]   S = -1/3
#   traj 1 (group "a"): delta = [1, 1, pad]       s      = [1, 1]       S = 1
#   traj 2 (group "b"): delta = [0, pad, pad]     s      = [0]          S = 0     (lone, one valid token)
#   traj 3 (group "c"): delta = [1, -2, pad]      s      = [1, -4]      S = -1.5  (lone, two valid tokens)
HAND_POS = [[-1.0, -0.5, -2.0], [-0.5, -1.0, 1e30], [-1.0, -7.0, -7.0], [-1.0, -3.0, -1e30]]
HAND_NEG = [[-2.0, -0.5, -1.0], [-1.5, -2.0, -1e30], [-1.0, 0.0, 0.0], [-2.0, -1.0, 5e29]]
HAND_MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]]
HAND_GROUPS = ["a", "a", "b", "c"]


def _hand_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pos = torch.tensor(HAND_POS, dtype=torch.float64)
    neg = torch.tensor(HAND_NEG, dtype=torch.float64)
    return pos, neg, torch.tensor(HAND_MASK, dtype=torch.bool)


def reference_weights(pos, neg, mask, groups, *, gamma, alpha, w_min, w_max, eps, level):
    """Loop-based float64 re-derivation of vzero-method.md steps 1-5 (and the documented token-level variant)."""
    pos, neg, mask = (np.asarray(x, dtype=np.float64) for x in (pos, neg, mask))
    B, T = pos.shape
    s = np.zeros((B, T))
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                d = pos[i, t] - neg[i, t]
                s[i, t] = max(d, 0.0) - gamma * max(-d, 0.0)
    if level == "sequence":
        S = np.zeros(B)
        for i in range(B):
            n = sum(1 for t in range(T) if mask[i, t])
            S[i] = sum(s[i, t] for t in range(T) if mask[i, t]) / max(n, eps)
        w = np.zeros(B)
        for i in range(B):
            members = [S[j] for j in range(B) if groups[j] == groups[i]]
            if len(members) == 1:
                A = 0.0
            else:
                mean = sum(members) / len(members)
                std = math.sqrt(sum((x - mean) ** 2 for x in members) / len(members))
                A = (S[i] - mean) / (std + eps)
            w[i] = min(max(1.0 + alpha * A, w_min), w_max)
        return w
    w = np.zeros((B, T))
    for i in range(B):
        pooled = [s[j, t] for j in range(B) if groups[j] == groups[i] for t in range(T) if mask[j, t]]
        mean = sum(pooled) / max(len(pooled), 1)
        std = math.sqrt(sum((x - mean) ** 2 for x in pooled) / max(len(pooled), 1))
        for t in range(T):
            if mask[i, t]:
                A = (s[i, t] - mean) / (std + eps) if len(pooled) > 1 else 0.0
                w[i, t] = min(max(1.0 + alpha * A, w_min), w_max)
    return w


def _random_case(seed: int, dtype: torch.dtype = torch.float64):
    """Random groups of sizes 1..8 (some of size 1), interleaved; random masks with some all-masked rows."""
    rng = np.random.default_rng(seed)
    sizes = [1, 1, *rng.integers(1, 9, size=rng.integers(2, 5)).tolist()]
    groups = [f"uid-{g}" for g, n in enumerate(sizes) for _ in range(n)]
    rng.shuffle(groups)
    B, T = len(groups), int(rng.integers(1, 12))
    pos = rng.normal(-1.5, 1.0, size=(B, T))
    neg = rng.normal(-1.5, 1.0, size=(B, T))
    lengths = rng.integers(0, T + 1, size=B)
    lengths[rng.integers(0, B)] = 0  # at least one all-masked row
    mask = np.arange(T)[None, :] < lengths[:, None]
    pos[~mask] = 1e30  # garbage padding
    neg[~mask] = -1e30
    params = {
        "gamma": float(rng.uniform(0.5, 2.0)),
        "alpha": float(rng.uniform(0.2, 1.5)),
        "w_min": float(rng.uniform(0.0, 0.5)),
        "w_max": float(rng.uniform(1.5, 3.0)),
    }
    as_tensor = lambda x: torch.tensor(x, dtype=dtype)  # noqa: E731
    return as_tensor(pos), as_tensor(neg), torch.tensor(mask), groups, params


def test_sequence_weights_hand_case():
    pos, neg, mask = _hand_inputs()
    w, diag = evidence_weights(pos, neg, mask, HAND_GROUPS, gamma=2.0, alpha=0.5)
    # Group "a": S = [-1/3, 1], mean 1/3, population std 2/3, so A = ∓(2/3)/(2/3 + eps). Lone groups get A = 0.
    a = (2 / 3) / (2 / 3 + EPS)
    expected = torch.tensor([1 - 0.5 * a, 1 + 0.5 * a, 1.0, 1.0])
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-7)

    assert set(diag) == set(DIAGNOSTIC_KEYS)
    S = [-1 / 3, 1.0, 0.0, -1.5]
    S_mean = sum(S) / 4  # -5/24
    assert diag["score_mean"] == pytest.approx(-5 / 24, abs=1e-12)
    assert diag["score_std"] == pytest.approx(math.sqrt(sum((x - S_mean) ** 2 for x in S) / 4), abs=1e-12)
    assert diag["adv_mean"] == pytest.approx(0.0, abs=1e-12)
    assert diag["adv_std"] == pytest.approx(a * math.sqrt(2 / 4), abs=1e-12)  # A = [-a, a, 0, 0]
    assert diag["weight_mean"] == pytest.approx(1.0, abs=1e-12)
    assert diag["weight_min"] == pytest.approx(1 - 0.5 * a, abs=1e-12)
    assert diag["weight_max"] == pytest.approx(1 + 0.5 * a, abs=1e-12)
    assert diag["frac_at_w_min"] == 0.0
    # Valid deltas: [1, 0, -1, 1, 1, 0, 1, -2] -> mean 1/8, 4 of 8 positive.
    assert diag["delta_mean"] == pytest.approx(1 / 8, abs=1e-12)
    assert diag["frac_delta_pos"] == pytest.approx(0.5, abs=1e-12)
    assert all(isinstance(v, float) for v in diag.values())


def test_token_weights_hand_case():
    pos, neg, mask = _hand_inputs()
    w, diag = evidence_weights(pos, neg, mask, HAND_GROUPS, gamma=2.0, alpha=0.5, level="token")
    # Group "a" pools s = [1, 0, -2, 1, 1]: mean 0.2, population variance 6.8/5 = 1.36.
    std_a = math.sqrt(1.36)
    wa = [1 + 0.5 * (x - 0.2) / (std_a + EPS) for x in (1, 0, -2, 1, 1)]
    # Group "c" (lone trajectory) pools its own s = [1, -4]: mean -1.5, std 2.5 -> token-level contrast survives.
    c = 2.5 / (2.5 + EPS)
    expected = torch.tensor(
        [
            [wa[0], wa[1], wa[2]],
            [wa[3], wa[4], 0.0],
            [1.0, 0.0, 0.0],  # group "b" has one valid token -> A = 0 -> w = 1; padding -> 0
            [1 + 0.5 * c, 1 - 0.5 * c, 0.0],
        ]
    )
    assert w.shape == (4, 3) and w.dtype == torch.float32
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-7)
    # Token-level stats run over the 8 valid tokens.
    valid_w = expected[mask]
    assert diag["weight_mean"] == pytest.approx(valid_w.double().mean().item(), abs=1e-7)
    assert diag["weight_min"] == pytest.approx(wa[2], abs=1e-7)
    assert diag["score_mean"] == pytest.approx((1 + 0 - 2 + 1 + 1 + 0 + 1 - 4) / 8, abs=1e-12)
    assert diag["delta_mean"] == pytest.approx(1 / 8, abs=1e-12)


def test_weights_clamp_to_range_and_count_frac_at_w_min():
    pos, neg, mask = _hand_inputs()
    # α = 2 pushes group "a" to 1 ∓ 2a ≈ -1 and 3, clamped to w_min = 0 and w_max = 2.
    w, diag = evidence_weights(pos, neg, mask, HAND_GROUPS, gamma=2.0, alpha=2.0)
    torch.testing.assert_close(w, torch.tensor([0.0, 2.0, 1.0, 1.0]), rtol=0, atol=0)
    assert diag["frac_at_w_min"] == 0.25
    assert diag["weight_min"] == 0.0 and diag["weight_max"] == 2.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("level", GATE_LEVELS)
def test_matches_numpy_reference_on_random_inputs(seed, level):
    pos, neg, mask, groups, params = _random_case(seed)
    w, diag = evidence_weights(pos, neg, mask, groups, eps=EPS, level=level, **params)
    expected = reference_weights(pos.numpy(), neg.numpy(), mask.numpy(), groups, eps=EPS, level=level, **params)
    np.testing.assert_allclose(w.numpy(), expected, rtol=0, atol=1e-6)
    assert all(math.isfinite(v) for v in diag.values())


def test_group_ids_as_strings_ints_and_tensors_agree():
    pos, neg, mask, groups, params = _random_case(11)
    names = sorted(set(groups))
    as_ints = [names.index(g) * 7 + 3 for g in groups]  # non-contiguous ints
    w_str, _ = evidence_weights(pos, neg, mask, groups, **params)
    w_list, _ = evidence_weights(pos, neg, mask, as_ints, **params)
    w_tensor, _ = evidence_weights(pos, neg, mask, torch.tensor(as_ints), **params)
    torch.testing.assert_close(w_list, w_str, rtol=0, atol=0)
    torch.testing.assert_close(w_tensor, w_str, rtol=0, atol=0)


@pytest.mark.parametrize("level", GATE_LEVELS)
def test_permuting_the_batch_permutes_the_weights(level):
    pos, neg, mask, groups, params = _random_case(12)
    perm = torch.randperm(len(groups), generator=torch.Generator().manual_seed(0))
    w, _ = evidence_weights(pos, neg, mask, groups, level=level, **params)
    w_perm, _ = evidence_weights(pos[perm], neg[perm], mask[perm], [groups[i] for i in perm], level=level, **params)
    torch.testing.assert_close(w_perm, w[perm], rtol=0, atol=1e-7)


def test_identical_scores_and_all_masked_groups_get_weight_one():
    pos = torch.tensor([[-1.0, -2.0], [-1.0, -2.0], [-3.0, 9.0], [5.0, 5.0], [7.0, 7.0]])
    neg = torch.tensor([[-2.0, -2.0], [-2.0, -2.0], [-3.5, 9.0], [0.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [0, 0], [0, 0]])
    # Group 0: three trajectories with S = 0.5 each; group 1: two all-masked rows (S = 0 each).
    w, diag = evidence_weights(pos, neg, mask, [0, 0, 0, 1, 1])
    torch.testing.assert_close(w, torch.ones(5), rtol=0, atol=0)
    assert diag["adv_std"] == 0.0


def test_lone_trajectory_gets_weight_one_whatever_its_score():
    pos = torch.tensor([[0.0, 0.0], [-9.0, -9.0]])
    neg = torch.tensor([[-5.0, -5.0], [0.0, 0.0]])
    w, _ = evidence_weights(pos, neg, torch.ones(2, 2), ["x", "y"], alpha=3.0)
    torch.testing.assert_close(w, torch.ones(2), rtol=0, atol=0)


@pytest.mark.parametrize("garbage", [float("inf"), float("-inf"), float("nan"), 1e30])
@pytest.mark.parametrize("level", GATE_LEVELS)
def test_masked_positions_are_never_read(garbage, level):
    pos, neg, mask, groups, params = _random_case(3)
    w_clean, d_clean = evidence_weights(pos, neg, mask, groups, level=level, **params)
    pos_bad, neg_bad = pos.clone(), neg.clone()
    pos_bad[~mask] = garbage
    neg_bad[~mask] = -garbage if garbage == garbage else garbage
    w_bad, d_bad = evidence_weights(pos_bad, neg_bad, mask, groups, level=level, **params)
    torch.testing.assert_close(w_bad, w_clean, rtol=0, atol=0)
    assert d_bad == d_clean


def test_float_mask_equals_bool_mask():
    pos, neg, mask, groups, params = _random_case(4)
    w_bool, _ = evidence_weights(pos, neg, mask, groups, **params)
    w_float, _ = evidence_weights(pos, neg, mask.float(), groups, **params)
    torch.testing.assert_close(w_float, w_bool, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("level", GATE_LEVELS)
def test_any_float_dtype_in_float32_out(dtype, level):
    pos, neg, mask, groups, params = _random_case(5, dtype=dtype)
    pos, neg = pos.masked_fill(~mask, 0.0), neg.masked_fill(~mask, 0.0)  # 1e30 overflows float16
    w, _ = evidence_weights(pos, neg, mask, groups, level=level, **params)
    assert w.dtype == torch.float32
    # The same (already rounded) input values, re-derived in float64.
    expected = reference_weights(
        pos.double().numpy(), neg.double().numpy(), mask.numpy(), groups, eps=EPS, level=level, **params
    )
    np.testing.assert_allclose(w.numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("level", GATE_LEVELS)
def test_cuda_matches_cpu(level):
    pos, neg, mask, groups, params = _random_case(6, dtype=torch.bfloat16)
    w_cpu, d_cpu = evidence_weights(pos, neg, mask, groups, level=level, **params)
    ids = torch.tensor([sorted(set(groups)).index(g) for g in groups], device="cuda")
    w_gpu, d_gpu = evidence_weights(pos.cuda(), neg.cuda(), mask.cuda(), ids, level=level, **params)
    assert w_gpu.device.type == "cuda" and w_gpu.dtype == torch.float32
    torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=0, atol=1e-6)
    assert d_gpu == pytest.approx(d_cpu, abs=1e-6)


@pytest.mark.parametrize("level", GATE_LEVELS)
def test_empty_batch_and_no_valid_tokens_give_zero_diagnostics(level):
    w, diag = evidence_weights(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4), [], level=level)
    assert w.shape == ((0,) if level == "sequence" else (0, 4))
    assert set(diag) == set(DIAGNOSTIC_KEYS) and all(v == 0.0 for v in diag.values())

    nan = torch.full((3, 2), float("nan"))
    w, diag = evidence_weights(nan, nan, torch.zeros(3, 2, dtype=torch.bool), [1, 1, 2], level=level)
    assert torch.isfinite(w).all()
    expected_w = torch.ones(3) if level == "sequence" else torch.zeros(3, 2)
    torch.testing.assert_close(w, expected_w, rtol=0, atol=0)
    assert all(math.isfinite(v) for v in diag.values())
    assert diag["delta_mean"] == 0.0 and diag["frac_delta_pos"] == 0.0


@pytest.mark.parametrize("level", GATE_LEVELS)
def test_weights_are_detached(level):
    pos = torch.randn(4, 3, requires_grad=True)
    neg = torch.randn(4, 3, requires_grad=True)
    w, _ = evidence_weights(pos, neg, torch.ones(4, 3), [0, 0, 1, 1], level=level)
    assert not w.requires_grad and w.grad_fn is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"neg_logprobs": torch.zeros(2, 4)}, "neg_logprobs shape"),
        ({"pos_logprobs": torch.zeros(2, 3, 1)}, "pos_logprobs must be"),
        ({"pos_logprobs": torch.zeros(2, 3, dtype=torch.long)}, "pos_logprobs must be"),
        ({"response_mask": torch.ones(3, 2)}, "response_mask must be"),
        ({"group_ids": [0, 0, 1]}, "group_ids has 3 entries but the batch has B=2"),
        ({"group_ids": torch.zeros(2, 1)}, "group_ids must be 1-D"),
        ({"level": "trajectory"}, r"level must be one of \('sequence', 'token'\)"),
        ({"w_min": 2.0, "w_max": 1.0}, "w_min"),
        ({"eps": 0.0}, "eps must be > 0"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
    args = {
        "pos_logprobs": torch.zeros(2, 3),
        "neg_logprobs": torch.zeros(2, 3),
        "response_mask": torch.ones(2, 3),
        "group_ids": [0, 1],
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        evidence_weights(**args)


def test_shuffle_within_groups_keeps_each_groups_weights_and_only_moves_them_inside_it() -> None:
    from gating.gate import shuffle_within_groups

    w = torch.tensor([0.0, 0.5, 1.5, 2.0, 1.0, 0.25, 1.75])
    groups = ["a", "a", "a", "a", "b", "c", "c"]
    outs = [shuffle_within_groups(w, groups, seed=s) for s in range(20)]
    for out in outs:
        for g in set(groups):
            idx = [i for i, x in enumerate(groups) if x == g]
            assert sorted(out[idx].tolist()) == sorted(w[idx].tolist()), "each group keeps its multiset of weights"
        assert out[4] == 1.0, "a lone trajectory keeps its weight"
    assert torch.equal(outs[3], shuffle_within_groups(w, groups, seed=3)), "deterministic given the seed"
    assert any(not torch.equal(o[:4], w[:4]) for o in outs), "the assignment inside a group changes"
    # Another group in the batch does not change group a's permutation.
    alone = shuffle_within_groups(w[:4], groups[:4], seed=3)
    assert torch.equal(alone, outs[3][:4])
    with pytest.raises(ValueError, match="one group id each"):
        shuffle_within_groups(w, groups[:3], seed=0)
