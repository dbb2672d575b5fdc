"""Sampling away from temperature 1: the PPO ratio must compare against the distribution that produced the samples.

The sampler and learner classes run in-process (the same plain classes the driver makes remote). Invariants at
rollout.temperature = 0.7, on both engines: the sampler's log-probs `lp_old` are those of the tempered distribution
it sampled from, log_softmax((raw logits with the never-sampled ids at -inf) / 0.7), recomputed here from the raw
logits of a plain transformers forward; the teacher's stay at temperature 1; and the learner's first on-policy step
sees an importance ratio of 1 on every token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.sampler import Sampler
from gating.teacher import Gating, teacher_inputs
from learner.learner import Learner
from tests.conftest import needs_vllm, tiny_config
from vzero.data.stream import PromptStream
from vzero.engines.base import banned_token_ids
from vzero.images import decode_rgb
from vzero.logprobs import response_logprobs
from vzero.models.loading import load_model, load_processor
from vzero.vlm_inputs import ImageEncoder, collate

pytestmark = pytest.mark.slow
TEMPERATURE = 0.7


def _raw_logits(cfg, rows) -> list[torch.Tensor]:
    """[T, V] raw logits at the response positions of each (prompt_ids, image(s), response_ids), plain transformers."""
    proc = load_processor(cfg.student.path)
    model = load_model(cfg.student.path).eval()
    encode = ImageEncoder(proc.image_processor, min_pixels=cfg.student.min_pixels, max_pixels=cfg.student.max_pixels)
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    out = []
    for prompt_ids, images, response_ids in rows:
        encoded = [encode(im) for im in (images if isinstance(images, list) else [images])]
        batch = collate([(prompt_ids, encoded, response_ids)], pad_id=0, image_pad_id=pad)
        with torch.no_grad():
            out.append(response_logprobs(model, batch, return_logits=True).logits[0, : len(response_ids)])
    return out


def _token_lp(logits: torch.Tensor, ids: list[int], *, temperature: float = 1.0, banned=()) -> np.ndarray:
    masked = logits.index_fill(-1, torch.tensor(list(banned), dtype=torch.long), float("-inf")) if banned else logits
    return torch.log_softmax(masked / temperature, -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1).numpy()


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=needs_vllm)])
def test_sampler_and_learner_logprobs_are_those_of_the_tempered_distribution(
    engine, tiny_model, synth_data, tmp_path
) -> None:
    cfg = tiny_config(
        tmp_path,
        tiny_model,
        synth_data,
        f"rollout.engine={engine}",
        "teacher.engine=transformers",
        f"rollout.temperature={TEMPERATURE}",
        "rollout.n=3",
        "rollout.max_tokens=8",
        "learner.mini_batches_per_step=1",  # one update on the whole batch: a later mini-batch is off-policy by design
    )
    prompts = PromptStream(cfg.data.path, seed=0).next_batch(2)
    by_uid = {p.uid: p for p in prompts}
    trajectories, _ = Sampler(cfg, 0).generate(prompts, seed=5)

    tokenizer = load_processor(cfg.student.path).tokenizer
    logits = _raw_logits(cfg, [(t.prompt_ids, decode_rgb(by_uid[t.uid].image), t.response_ids) for t in trajectories])
    banned = banned_token_ids(tokenizer, logits[0].shape[-1])
    atol = 2e-5 if engine == "transformers" else 2e-4
    gap = 0.0
    for t, lg in zip(trajectories, logits, strict=True):
        want = _token_lp(lg, t.response_ids, temperature=TEMPERATURE, banned=banned)
        np.testing.assert_allclose(t.lp_old, want, atol=atol, rtol=0)
        gap = max(gap, float(np.abs(_token_lp(lg, t.response_ids) - want).max()))
    assert gap > 1e-2, "the check tells tempered from raw log-probs apart"

    gated, _ = Gating(cfg, 0).gate(trajectories, by_uid)  # the teacher scores at temperature 1, on its views
    views = {p.uid: teacher_inputs(p, cfg, tokenizer) for p in prompts}
    teacher = _raw_logits(cfg, [(views[t.uid].prompt_ids, views[t.uid].pos, t.response_ids) for t in gated])
    for t, lg in zip(gated, teacher, strict=True):
        np.testing.assert_allclose(t.lp_pos, _token_lp(lg, t.response_ids), atol=2e-5, rtol=0)

    learner = Learner(cfg)
    for t, lp in zip(gated, learner.logprobs(gated, by_uid), strict=True):
        np.testing.assert_allclose(lp, t.lp_old, atol=atol, rtol=0)
    metrics = learner.train_step(gated, by_uid)  # on-policy: ratio 1 on every token
    assert metrics["loss/ratio_mean"] == pytest.approx(1.0, abs=5 * atol)
    assert metrics["loss/ratio_max"] == pytest.approx(1.0, abs=5 * atol)
