"""GatingActor: teacher replay of every trajectory under the positive and negative views, then the gate.

For each prompt it builds the two views once (evidence crop; hard-negative crop or downsampled crop), submits the
positive AND negative replays of all the step's trajectories to its engine in one batch, reads back the per-token
log-probs of the sampled response tokens (response-aligned: the teacher prompt holds a crop, so its length differs
from the student's; alignment is on the response suffix, never on absolute positions), and calls the pure
`evidence_gate`. With the gate disabled every weight is 1 (plain on-policy distillation, the baseline). The gate's
per-element quantities go back to the driver under `TERMS_KEY` (not averaged here): with several gating actors the
driver computes the step's gate statistics once over all of them (`gating.gate.gate_diagnostics`).

A plain class; the driver makes it a Ray actor. Knows nothing about the learner or the samplers.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from gating.gate import evidence_gate, shuffle_within_groups
from vzero.batching import length_mask, pad_ragged
from vzero.config import TrainConfig
from vzero.engines import ScoreRequest, create_engine
from vzero.records import Prompt, Trajectory
from vzero.runtime import actor_device, derive_seed, setup_threads
from vzero.views import views_for
from vzero.vlm_inputs import chat_prompt_ids

TERMS_KEY = "gate/terms"  # stats entry holding this actor's GateTerms (the rest of the stats are floats)


class Gating:
    def __init__(self, cfg: TrainConfig, rank: int = 0):
        self.cfg = cfg
        self.rank = rank
        setup_threads(cfg.teacher.resources)
        self.device = actor_device(cfg.teacher.resources)
        self.engine = create_engine(
            cfg.teacher.engine,
            cfg.teacher_model,
            device=self.device,
            vllm=cfg.teacher.vllm,
            seed=cfg.seed,
            batch_size=cfg.teacher.micro_batch_size,
        )
        self.tokenizer = self.engine.tokenizer

    def gate(
        self, trajectories: list[Trajectory], prompts: dict[str, Prompt]
    ) -> tuple[list[Trajectory], dict[str, Any]]:
        """Fill lp_pos, lp_neg and the gate weight(s) of every trajectory; return them with timings, counts and
        the gate's `GateTerms` (under `TERMS_KEY`)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        views, teacher_ids = {}, {}
        for uid in dict.fromkeys(t.uid for t in trajectories):
            p = prompts[uid]
            views[uid] = views_for(
                p,
                mode=cfg.views.negative_mode,
                margin=cfg.views.margin,
                max_pixels=cfg.teacher_model.max_pixels,
                factor=cfg.views.downsample_factor,
                seed=cfg.views.seed,
            )
            teacher_ids[uid] = chat_prompt_ids(self.tokenizer, p.question, cfg.teacher_model.chat)
        t_views = time.perf_counter() - t0

        topk = cfg.loss.teacher_topk if cfg.loss.mode == "forward_kl_topk" else 0
        pos = [ScoreRequest(teacher_ids[t.uid], views[t.uid][0], t.response_ids, topk=topk) for t in trajectories]
        neg = [ScoreRequest(teacher_ids[t.uid], views[t.uid][1], t.response_ids) for t in trajectories]
        t1 = time.perf_counter()
        results = self.engine.score(pos + neg)  # one submission: both views of every trajectory
        t_score = time.perf_counter() - t1
        res_pos, res_neg = results[: len(trajectories)], results[len(trajectories) :]

        lp_pos = pad_ragged([r.logprobs for r in res_pos])
        lp_neg = pad_ragged([r.logprobs for r in res_neg])
        mask = length_mask([t.num_tokens for t in trajectories])
        g = cfg.gate
        weights, terms = evidence_gate(
            lp_pos,
            lp_neg,
            mask,
            [t.uid for t in trajectories],
            gamma=g.gamma,
            alpha=g.alpha,
            w_min=g.w_min,
            w_max=g.w_max,
            eps=g.eps,
            level=g.level,
        )
        if g.shuffle_control:  # control: the same weights, permuted within each group (see gate.py)
            version = trajectories[0].policy_version if trajectories else 0
            weights = shuffle_within_groups(weights, [t.uid for t in trajectories], seed=derive_seed(cfg.seed, version))
        if not g.enabled:  # OPD baseline: keep the diagnostics (what the gate would have said), apply nothing
            weights = torch.ones_like(weights)
        for i, t in enumerate(trajectories):
            T = t.num_tokens
            t.lp_pos, t.lp_neg = res_pos[i].logprobs, res_neg[i].logprobs
            t.negative_mode = views[t.uid][2]
            if weights.dim() == 1:
                t.weight = float(weights[i])
            else:
                t.token_weights = weights[i, :T].tolist()
                t.weight = float(weights[i, :T].mean()) if T else 1.0
            if topk:
                t.teacher_topk_ids, t.teacher_topk_logprobs = res_pos[i].topk_ids, res_pos[i].topk_logprobs
        tokens = float(mask.sum())
        stats: dict[str, Any] = {TERMS_KEY: terms}
        stats.update(
            {
                "teacher/seconds": time.perf_counter() - t0,
                "teacher/score_seconds": t_score,
                "teacher/views_seconds": t_views,
                "teacher/tokens": tokens,
                "teacher/tokens_per_s": 2 * tokens / max(t_score, 1e-9),  # both views are replayed
                "teacher/fallback_negatives": float(sum(1 for v in views.values() if v[2] != cfg.views.negative_mode)),
            }
        )
        return trajectories, stats

    def ready(self) -> str:
        """Returns once __init__ finished (the driver waits on it); names the engine."""
        return f"gating-{self.rank}: {self.engine.name} on {self.device}"


def merge_stats(parts: list[dict[str, float]]) -> dict[str, float]:
    """One step's teacher stats from several gating actors (without `TERMS_KEY`). They run in parallel: counts add,
    durations are the slowest actor's, the rate is all tokens over that duration (never a mean of per-actor values)."""
    out: dict[str, float] = {}
    for st in parts:
        for key, v in st.items():
            if key.endswith("_per_s"):
                continue
            out[key] = max(out.get(key, 0.0), v) if key.endswith("seconds") else out.get(key, 0.0) + v
    if "teacher/tokens" in out:  # both views are replayed
        out["teacher/tokens_per_s"] = 2 * out["teacher/tokens"] / max(out.get("teacher/score_seconds", 0.0), 1e-9)
    return out
