"""The learner's shared-prefix forward (learner.shared_prefix, the default): the same step, less computed.

Invariants: with each group's image and question computed once per micro-batch the log-probs, the loss and every
gradient (vision tower included) equal the unshared forward's (≤ 1e-5, float32), on the cache route and, under
gradient checkpointing, on the packed route; Qwen3.5 (cache route only) is exact too and falls back to the unshared
forward under gradient checkpointing; the token budget and the sequence-token count count each prefix once (what is
really computed). Real tiny random-init models, no mocks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.learner import Learner, _Pass
from learner.micro_batches import forward_positions
from tests.conftest import tiny_config
from vzero.data.stream import PromptStream
from vzero.records import Trajectory
from vzero.vlm_inputs import chat_prompt_ids


def _setup(tmp_path, model, data):
    """3 prompts x 4 responses of 2..9 tokens with made-up sampler / teacher log-probs (the loss only needs them)."""
    cfg = tiny_config(tmp_path, model, data, "rollout.n=4")
    prompts = {p.uid: p for p in PromptStream(cfg.data.path, seed=0).next_batch(3)}
    tok = Learner(cfg).tokenizer
    rng = np.random.RandomState(0)
    trajs = []
    for uid, p in prompts.items():
        ids = chat_prompt_ids(tok, p.question)
        for j in range(4):
            T = int(rng.randint(2, 10))
            lp = (-rng.rand(T) * 3).tolist()
            resp = rng.randint(0, 400, size=T).tolist()
            trajs.append(Trajectory(uid, j, 0, ids, resp, lp, "stop", lp_pos=lp[::-1], weight=1.0))
    return cfg, prompts, trajs


@pytest.fixture(scope="module")
def setup(tiny_model, synth_data, tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("shared"), tiny_model, synth_data)


def _step(cfg, prompts, trajs, **learner_fields):
    """One mini-batch's accumulation, stopped before the optimizer: (learner, metrics, gradients)."""
    c = cfg.model_copy(deep=True)
    for k, v in learner_fields.items():
        setattr(c.learner, k, v)
    learner = Learner(c)
    images = learner._encode_images(prompts, [t.uid for t in trajs])
    acc = learner._mini_batch_backward(trajs, images, _Pass(sum(t.num_tokens for t in trajs)))
    grads = {n: p.grad.detach().clone() for n, p in learner.model.named_parameters() if p.grad is not None}
    return learner, acc, grads


def _assert_same_step(a, b, prompts, trajs) -> None:
    (la, acc_a, ga), (lb, acc_b, gb) = a, b
    assert acc_b["loss"] == pytest.approx(acc_a["loss"], rel=1e-6)
    assert gb.keys() == ga.keys() and any(".visual." in f".{n}" for n in ga)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-5, rtol=0, msg=lambda m, n=n: f"{n}: {m}")
    for x, y in zip(la.logprobs(trajs, prompts), lb.logprobs(trajs, prompts), strict=True):
        np.testing.assert_allclose(y, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("checkpointing", "route"), [(False, "cache"), (True, "packed")])
def test_shared_prefix_step_has_the_unshared_logprobs_loss_and_gradients(setup, checkpointing, route) -> None:
    cfg, prompts, trajs = setup
    opts = {"micro_batch_size": 6, "gradient_checkpointing": checkpointing}  # micro-batches cut across groups
    plain = _step(cfg, prompts, trajs, shared_prefix=False, **opts)
    shared = _step(cfg, prompts, trajs, shared_prefix=True, **opts)
    assert (plain[0].shared_route, shared[0].shared_route) == (None, route)
    _assert_same_step(plain, shared, prompts, trajs)
    assert shared[1]["seq_tokens"] < plain[1]["seq_tokens"], "each prefix computed (and counted) once per micro-batch"


def test_qwen3_5_shares_on_the_cache_route_and_falls_back_under_checkpointing(synth_data, tmp_path_factory) -> None:
    """Qwen3.5's Gated DeltaNet states are indexed to the rows like keys/values (cache route); checkpointed layers
    drop the cache and it has no packed route, so with gradient_checkpointing it runs unshared, with the same step."""
    from vzero.models.tiny import build_model

    model = build_model(tmp_path_factory.mktemp("qwen3_5"), arch="qwen3_5", seed=1)
    cfg, prompts, trajs = _setup(tmp_path_factory.mktemp("q35"), model, synth_data)
    shared = _step(cfg, prompts, trajs, micro_batch_size=6)
    fallback = _step(cfg, prompts, trajs, micro_batch_size=6, gradient_checkpointing=True)
    assert (shared[0].shared_route, fallback[0].shared_route) == ("cache", None)
    _assert_same_step(fallback, shared, prompts, trajs)


def test_token_budget_counts_each_prefix_once(setup) -> None:
    cfg, prompts, trajs = setup
    group = [t for t in trajs if t.uid == trajs[0].uid]
    learner = Learner(cfg)
    images = learner._encode_images(prompts, [group[0].uid])
    P = len(group[0].prompt_ids) - 1 + images[group[0].uid].num_pads
    T = max(t.num_tokens for t in group)
    assert forward_positions(group, images, None) == len(group) * (P + T)
    assert forward_positions(group, images, "cache") == P + len(group) * T
    assert forward_positions(group, images, "packed") == P + sum(t.num_tokens for t in group)
    budget = P + len(group) * T  # one shared group fits; unshared, the same rows need four micro-batches
    for shared, count in ((True, 1), (False, 4)):
        c = cfg.model_copy(deep=True)
        c.learner.max_tokens_per_micro_batch, c.learner.shared_prefix = budget, shared
        assert len(Learner(c)._micro_batches(group, images)) == count
