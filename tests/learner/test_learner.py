"""The learner, sampler and gating classes in-process (no Ray): the same plain classes the driver makes remote.

Invariants: one train step moves the weights and bumps the version; how a mini-batch is split into micro-batches
(count or token budget) does not change the loss or the update (token-mean over the mini-batch); k mini-batches per
step are k AdamW steps, the same as k single-mini-batch steps on the same prompt groups; recomputed old log-probs make
the first mini-batch's ratio exactly 1 and are the pre-update weights' for the later ones; the sampler-vs-learner
log-prob mismatch is ~0 for samples from the same weights; the sampler skips a version it already has and its
outputs change after a push; a checkpoint round-trips model + optimizer.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from actors.sampler import Sampler
from gating.teacher import Gating
from learner.learner import Learner, _Pass
from tests.conftest import tiny_config
from vzero.batching import split_mini_batches
from vzero.data.stream import PromptStream


@pytest.fixture(scope="module")
def setup(tiny_model, synth_data, tmp_path_factory):
    cfg = tiny_config(
        tmp_path_factory.mktemp("inproc"),
        tiny_model,
        synth_data,
        "rollout.engine=transformers",
        "teacher.engine=transformers",
        "rollout.n=3",
        "rollout.max_tokens=6",
    )
    prompts = PromptStream(cfg.data.path, seed=0).next_batch(3)
    sampler = Sampler(cfg, 0)
    trajectories, _stats = sampler.generate(prompts, seed=11)
    gated, gate_stats = Gating(cfg, 0).gate(trajectories, {p.uid: p for p in prompts})
    return cfg, sampler, {p.uid: p for p in prompts}, gated, gate_stats


def _params(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters()}


def test_gating_fills_teacher_logprobs_and_weights(setup) -> None:
    cfg, _, _prompts, gated, stats = setup
    assert len(gated) == 3 * cfg.rollout.n
    for t in gated:
        assert len(t.lp_pos) == len(t.lp_neg) == t.num_tokens
        assert 0.0 <= t.weight <= 2.0
        assert t.negative_mode in ("hard_negative_crop", "downsample_teacher_crop")
    assert stats["teacher/tokens"] == sum(t.num_tokens for t in gated)
    assert any(a != b for t in gated for a, b in zip(t.lp_pos, t.lp_neg, strict=True)), "the two views differ"


def _with(cfg, **learner_and_loss):
    """A copy of cfg with learner.* / loss.* fields set (keys as `learner__x` / `loss__y`)."""
    c = cfg.model_copy(deep=True)
    for key, v in learner_and_loss.items():
        section, field = key.split("__")
        setattr(getattr(c, section), field, v)
    return c


def _step_gradients(learner: Learner, gated, prompts) -> tuple[int, dict[str, float], dict[str, torch.Tensor]]:
    """One mini-batch's accumulation (all of `gated`), stopped before the optimizer: (micro-batches, metrics, grads)."""
    images = learner._encode_images(prompts, [t.uid for t in gated])
    micro = learner._micro_batches(gated, images)
    acc = learner._mini_batch_backward(gated, images, _Pass(sum(t.num_tokens for t in gated)))
    grads = {n: p.grad.detach().clone() for n, p in learner.model.named_parameters() if p.grad is not None}
    return len(micro), acc, grads


def test_micro_batch_split_does_not_change_the_step(setup) -> None:
    """Loss and gradients are the token-mean over the whole step whatever the split (count or token budget)."""
    cfg, _, prompts, gated, _ = setup
    results = []
    for overrides in ({"micro_batch_size": 64}, {"micro_batch_size": 1}, {"max_tokens_per_micro_batch": 80}):
        c = cfg.model_copy(deep=True)
        for k, v in overrides.items():
            setattr(c.learner, k, v)
        results.append(_step_gradients(Learner(c), gated, prompts))
    assert [r[0] for r in results][:2] == [1, len(gated)] and results[2][0] > 1
    base_loss, base_grads = results[0][1]["loss"], results[0][2]
    assert any(g.abs().max() > 0 for g in base_grads.values())
    for _, acc, grads in results[1:]:
        assert acc["loss"] == pytest.approx(base_loss, rel=1e-5, abs=1e-7)
        assert grads.keys() == base_grads.keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, base_grads[n], rtol=1e-4, atol=1e-7)


def test_one_step_moves_the_weights_and_bumps_the_version(setup) -> None:
    cfg, _, prompts, gated, _ = setup
    learner = Learner(cfg)
    before = _params(learner)
    metrics = learner.train_step(gated, prompts)
    assert metrics["policy_version"] == 1 and learner.policy_version() == 1
    assert any((p - before[n]).abs().max() > 0 for n, p in _params(learner).items())
    assert {"loss", "learner/grad_norm", "learner/tokens_per_s", "loss/k1_mean", "loss/clip_frac"} <= set(metrics)


def _adam_steps(learner: Learner) -> set[int]:
    return {int(st["step"]) for st in learner.optimizer.state.values()}


def test_two_mini_batches_are_two_sequential_steps_on_the_halves(setup) -> None:
    """k = 2: two AdamW steps, each a token-mean over its half; the same as two k = 1 steps on those halves."""
    cfg, _, prompts, gated, _ = setup
    first, second = split_mini_batches(gated, 2)
    assert {t.uid for t in first}.isdisjoint({t.uid for t in second}) and len(first) + len(second) == len(gated)
    two = Learner(_with(cfg, learner__mini_batches_per_step=2, loss__old_logprobs="sampler"))
    metrics = two.train_step(gated, prompts)
    one = Learner(_with(cfg, learner__mini_batches_per_step=1, loss__old_logprobs="sampler"))
    m1, m2 = one.train_step(first, prompts), one.train_step(second, prompts)
    assert _adam_steps(two) == _adam_steps(one) == {2}
    assert metrics["policy_version"] == 1 and m2["policy_version"] == 2, "one version per rollout batch"
    for (n, p), (_, q) in zip(two.model.named_parameters(), one.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=n)
    n1, n2 = (sum(t.num_tokens for t in half) for half in (first, second))
    assert metrics["learner/mini_batches"] == 2
    assert metrics["loss/last_mini_batch"] == pytest.approx(m2["loss"], rel=1e-6)
    assert metrics["loss"] == pytest.approx((m1["loss"] * n1 + m2["loss"] * n2) / (n1 + n2), rel=1e-6)
    assert metrics["learner/grad_norm"] == pytest.approx((m1["learner/grad_norm"] + m2["learner/grad_norm"]) / 2)


def test_recomputed_old_logprobs_are_the_pre_update_weights(setup) -> None:
    """recompute: ratio exactly 1 on the first mini-batch; the later ones use the log-probs before the first update
    (the same step as the sampler's old log-probs replaced by the initial learner's)."""
    cfg, _, prompts, gated, _ = setup
    single = Learner(_with(cfg, learner__mini_batches_per_step=1, loss__old_logprobs="recompute"))
    m = single.train_step(gated, prompts)
    assert m["loss/ratio_max"] == 1.0 and m["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-12)
    assert m["loss/clip_frac"] == 0.0 and m["learner/old_logprobs_recomputed"] == 1.0

    recompute = Learner(_with(cfg, loss__old_logprobs="recompute"))
    lp_initial = recompute.logprobs(gated, prompts)
    initial = [dataclasses.replace(t, lp_old=lp) for t, lp in zip(gated, lp_initial, strict=True)]
    # The sampler's own numbers are not read: shift them by 0.5 nats.
    shifted = [dataclasses.replace(t, lp_old=[x - 0.5 for x in t.lp_old]) for t in gated]
    mr = recompute.train_step(shifted, prompts)
    replayed = Learner(_with(cfg, loss__old_logprobs="sampler"))
    ms = replayed.train_step(initial, prompts)
    # The second mini-batch runs at the once-stepped weights: its ratio is π_1 / π_0, not 1.
    assert abs(mr["loss/ratio_mean"] - 1) > 1e-3 and mr["loss/ratio_max"] > 1.01
    for key in ("loss", "loss/last_mini_batch", "loss/ratio_mean", "loss/ratio_max", "loss/clip_frac"):
        assert mr[key] == pytest.approx(ms[key], rel=1e-5, abs=1e-7), key
    for (n, p), (_, q) in zip(recompute.model.named_parameters(), replayed.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("old_logprobs", ["recompute", "sampler"])
def test_logprob_mismatch_is_near_zero_for_samples_from_the_same_weights(setup, old_logprobs) -> None:
    cfg, _, prompts, gated, _ = setup
    learner = Learner(_with(cfg, loss__old_logprobs=old_logprobs))
    fresh = learner.train_step(gated, prompts)
    # Transformers sampled these tokens with the learner's initial weights (fp32 CPU: KV-cache vs full forward).
    assert 0.0 <= fresh["rollout/logprob_mismatch"] <= fresh["rollout/logprob_mismatch_max"] < 1e-5
    # recompute reads every token before the first update; sampler mode only the first mini-batch's.
    first = split_mini_batches(gated, cfg.learner.mini_batches_per_step)[0]
    expected = gated if old_logprobs == "recompute" else first
    assert fresh["rollout/logprob_mismatch_tokens"] == sum(t.num_tokens for t in expected)
    moved = learner.train_step(gated, prompts)  # the weights have stepped twice since these samples
    assert moved["rollout/logprob_mismatch"] > 1e3 * max(fresh["rollout/logprob_mismatch"], 1e-9)


def test_auto_old_logprobs_recompute_in_sync_and_keep_the_samplers_in_async(setup) -> None:
    cfg, _, prompts, gated, _ = setup
    assert cfg.mode == "sync" and cfg.loss.old_logprobs == "auto"
    assert Learner(cfg).train_step(gated, prompts)["learner/old_logprobs_recomputed"] == 1.0
    async_cfg = cfg.model_copy(deep=True)
    async_cfg.mode = "async"
    assert Learner(async_cfg).train_step(gated, prompts)["learner/old_logprobs_recomputed"] == 0.0


def test_sampler_takes_new_weights_and_skips_old_versions(setup) -> None:
    cfg, sampler, prompts, gated, _ = setup
    learner = Learner(cfg)
    learner.train_step(gated, prompts)
    learner.train_step(gated, prompts)
    before, _ = sampler.generate(list(prompts.values()), seed=5)
    res = sampler.update_weights(learner.state_for_push(), version=2)
    assert res["skipped"] == 0 and res["bytes"] > 0 and sampler.policy_version() == 2
    after, _ = sampler.generate(list(prompts.values()), seed=5)
    assert all(t.policy_version == 2 for t in after)
    assert [t.lp_old for t in after] != [t.lp_old for t in before], "same seed, new weights, new outputs"
    assert sampler.update_weights(learner.state_for_push(), version=1)["skipped"] == 1


def test_checkpoint_round_trip(setup, tmp_path) -> None:
    cfg, _, prompts, gated, _ = setup
    a = Learner(cfg)
    a.train_step(gated, prompts)
    a.save(str(tmp_path))
    b = Learner(cfg)
    assert b.load(str(tmp_path)) == 1
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    ma, mb = a.train_step(gated, prompts), b.train_step(gated, prompts)
    assert ma["loss"] == mb["loss"] and ma["learner/grad_norm"] == mb["learner/grad_norm"]
    assert not list(tmp_path.glob("**/*.bin")) and not list(tmp_path.glob("**/*.pt")), "nothing pickled"


def test_frozen_vision_tower_is_neither_trained_nor_pushed(setup) -> None:
    cfg, sampler, prompts, gated, _ = setup
    c = cfg.model_copy(deep=True)
    c.learner.freeze_vision = True
    learner = Learner(c)
    visual = {n: p.detach().clone() for n, p in learner.model.named_parameters() if ".visual." in f".{n}"}
    assert visual
    learner.train_step(gated, prompts)
    for n, p in learner.model.named_parameters():
        if n in visual:
            assert torch.equal(p, visual[n]), n
    push = learner.state_for_push()
    names = [m.name for b in push.buckets for m in b.metas]
    assert names and not any(".visual." in f".{n}" for n in names)
    res = sampler.update_weights(push, version=7)  # a partial push (no vision tower) loads fine
    assert res["skipped"] == 0 and res["tensors"] == len(names)
