"""The sharded learner group (learner.world_size=2: two FSDP2 ranks over gloo, real Ray actors) against the
single-process learner on the same batch, and its checkpoints.

Invariants: 2 ranks and 1 give the same loss, gradient norm and weights after 2 steps (within 1e-5: only the
reduction order differs); a DCP checkpoint written by the 2 ranks resumes exactly into 2 ranks and into a
world-size-1 learner, and a world-size-1 checkpoint resumes exactly into 2 ranks (the next step's loss and grad
norm are the uninterrupted learner's); the HF model dir rank 0 writes next to the shards holds the same weights.
"""

from __future__ import annotations

import pytest
import torch

from learner.learner import Learner
from tests.conftest import tiny_config
from vzero.models.loading import load_model
from vzero.weights import unpack_bucket

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def batch(tiny_model, synth_data, tmp_path_factory):
    from actors.sampler import Sampler
    from gating.teacher import Gating
    from vzero.data.stream import PromptStream

    cfg = tiny_config(
        tmp_path_factory.mktemp("fsdp"),
        tiny_model,
        synth_data,
        "rollout.engine=transformers",
        "teacher.engine=transformers",
        "rollout.n=3",
        "rollout.max_tokens=6",
        "learner.micro_batch_size=2",  # 9 trajectories: 5 + 4 per rank -> 3 and 2 micro-batches (an idle pass)
    )
    prompts = PromptStream(cfg.data.path, seed=0).next_batch(3)
    trajectories, _ = Sampler(cfg, 0).generate(prompts, seed=11)
    by_uid = {p.uid: p for p in prompts}
    gated, _ = Gating(cfg, 0).gate(trajectories, by_uid)
    return cfg, gated, by_uid


def _weights(push) -> dict[str, torch.Tensor]:
    return {n: t.clone() for b in push.buckets for n, t in unpack_bucket(b)}


def _step(metrics: dict[str, float]) -> tuple[float, float]:
    return metrics["loss"], metrics["learner/grad_norm"]


def test_two_ranks_step_like_one_and_their_checkpoints_resume_at_any_world_size(ray_local, batch, tmp_path) -> None:
    from learner.group import LearnerGroup

    cfg, gated, prompts = batch
    sharded = cfg.model_copy(deep=True)
    sharded.learner.world_size = 2
    one = Learner(cfg)
    group = LearnerGroup(sharded, "test-fsdp-a")
    resumed = None
    try:
        assert ray_local.get(group.ready.remote()).startswith("learner rank 0/2")
        for _ in range(2):
            ref = group.train_step.remote(gated, prompts)
            a, b = _step(one.train_step(gated, prompts)), _step(ray_local.get(ref))
            assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
        w1 = _weights(one.state_for_push("object_store"))
        w2 = _weights(ray_local.get(group.state_for_push.remote("object_store")))
        assert w1.keys() == w2.keys() and len(w1) > 10
        assert max((w1[n] - w2[n]).abs().max().item() for n in w1) < 1e-5

        ray_local.get(group.save.remote(str(tmp_path / "dcp2")))
        one.save(str(tmp_path / "plain1"))
        assert (tmp_path / "dcp2/dcp/.metadata").is_file() and (tmp_path / "dcp2/model/config.json").is_file()
        saved = load_model(tmp_path / "dcp2/model").state_dict()  # rank 0's HF dir: a complete, trained model
        assert max((w1[n] - saved[n]).abs().max().item() for n in w1) < 1e-5

        expected = _step(one.train_step(gated, prompts))  # step 3 of the uninterrupted learner
        assert _step(ray_local.get(group.train_step.remote(gated, prompts))) == pytest.approx(expected, rel=1e-5)

        resumed = LearnerGroup(sharded, "test-fsdp-b")
        for ckpt in ("dcp2", "plain1"):  # 2 ranks -> 2 ranks (DCP), 1 rank -> 2 ranks (HF dir + optimizer)
            assert ray_local.get(resumed.load.remote(str(tmp_path / ckpt))) == 2
            got = _step(ray_local.get(resumed.train_step.remote(gated, prompts)))
            assert got == pytest.approx(expected, rel=1e-5), ckpt
        single = Learner(cfg)  # 2 ranks -> 1 process: DCP read without a process group
        assert single.load(str(tmp_path / "dcp2")) == 2
        assert _step(single.train_step(gated, prompts)) == pytest.approx(expected, rel=1e-5)
    finally:
        group.shutdown()
        if resumed is not None:
            resumed.shutdown()
