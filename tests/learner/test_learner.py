"""The learner, sampler and gating classes in-process (no Ray): the same plain classes the driver makes remote.

Invariants: one train step moves the weights and bumps the version; how the step is split into micro-batches
(count or token budget) does not change the loss or the update (token-mean over the whole step); the sampler
skips a version it already has and its outputs change after a push; a checkpoint round-trips model + optimizer.
"""

from __future__ import annotations

import pytest
import torch

from actors.sampler import Sampler
from gating.teacher import Gating
from learner.learner import Learner
from tests.conftest import tiny_config
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


def _step_gradients(learner: Learner, gated, prompts) -> tuple[int, dict[str, float], dict[str, torch.Tensor]]:
    """train_step's accumulation, stopped before the optimizer: (micro-batches, metrics, gradients)."""
    images = learner._encode_images(prompts, [t.uid for t in gated])
    n_valid = sum(t.num_tokens for t in gated)
    micro = learner._micro_batches(gated, images)
    acc: dict[str, float] = {}
    learner.optimizer.zero_grad(set_to_none=True)
    for m in micro:
        learner._run(m, images, n_valid, acc)
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
