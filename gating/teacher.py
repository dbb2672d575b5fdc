"""GatingActor: teacher replay of every trajectory under the positive and negative views, then the gate.

For each prompt it builds the teacher prompt and the views once: the prompt from the row's own template
(`Prompt.teacher_prompt`, e.g. the authors' `teacher_raw_prompt`) or `teacher.prompt_template`, under
`teacher.context` (`full_and_crop`: the full image, then the crop(s); `crop`: the crops alone; vzero.teacher_prompt);
the views at the teacher's pixel budget (evidence crops; a hard-negative or downsampled crop each; the full image:
vzero.views). The positive request shows [full image, crops], the negative one [the SAME full image object,
negative crops]: only the evidence differs, and engines that cache image encodings by object encode the full image
once. It submits the positive AND negative replays of all the step's trajectories to its engine in one batch, reads
back the per-token log-probs of the sampled response tokens (response-aligned: the teacher prompt holds other images
than the student's, so its length differs; alignment is on the response suffix, never on absolute positions), and
calls the pure `evidence_gate`. With the gate disabled every weight is 1 (plain on-policy distillation, the
baseline). The gate's per-element quantities go back to the driver under `TERMS_KEY` (not averaged here): with
several gating actors the driver computes the step's gate statistics once over all of them
(`gating.gate.gate_diagnostics`).

A plain class; the driver makes it a Ray actor. Knows nothing about the learner or the samplers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from gating.gate import evidence_gate, shuffle_within_groups
from vzero.batching import length_mask, pad_ragged
from vzero.config import TrainConfig
from vzero.engines import ScoreRequest, create_engine
from vzero.records import Prompt, Trajectory
from vzero.runtime import actor_device, derive_seed, setup_threads
from vzero.teacher_prompt import teacher_prompt
from vzero.views import views_for
from vzero.vlm_inputs import chat_prompt_ids

TERMS_KEY = "gate/terms"  # stats entry holding this actor's GateTerms (the rest of the stats are floats)


@dataclass
class TeacherInputs:
    """What the teacher replays for one prompt: its prompt ids and the images of both passes, in pad order."""

    prompt_ids: list[int]  # chat prompt, one image pad per image
    pos: list[Image.Image]  # [full image, crops] (full_and_crop) or [crops]
    neg: list[Image.Image]  # the same, each crop swapped for its negative (the full image is the same object)
    mode_used: str  # negative view actually used (vzero.views)


def teacher_inputs(prompt: Prompt, cfg: TrainConfig, tokenizer: Any) -> TeacherInputs:
    """The teacher prompt (the row's template verbatim, else `teacher.prompt_template`, under `teacher.context`)
    and its views at the teacher's pixel budget; a pure function of the prompt and the config."""
    t, v, model = cfg.teacher, cfg.views, cfg.teacher_model
    if prompt.teacher_prompt is not None:  # the row's own wording, verbatim
        tp = teacher_prompt(prompt.teacher_prompt, context=t.context)
    else:
        tp = teacher_prompt(t.prompt_template, context=t.context, question=prompt.question)
    views = views_for(
        prompt,
        mode=v.negative_mode,
        margin=v.margin,
        min_pixels=model.min_pixels,
        max_pixels=model.max_pixels,
        factor=v.downsample_factor,
        seed=v.seed,
        full="image" in tp.slots,
    )
    ids = chat_prompt_ids(tokenizer, tp.parts, model.chat)
    return TeacherInputs(ids, tp.images(views.full, views.pos), tp.images(views.full, views.neg), views.mode_used)


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
            scoring=cfg.teacher.scoring,
        )
        self.tokenizer = self.engine.tokenizer

    def gate(
        self, trajectories: list[Trajectory], prompts: dict[str, Prompt]
    ) -> tuple[list[Trajectory], dict[str, Any]]:
        """Fill lp_pos, lp_neg and the gate weight(s) of every trajectory; return them with timings, counts and
        the gate's `GateTerms` (under `TERMS_KEY`)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        inputs: dict[str, TeacherInputs] = {}
        limit = cfg.teacher.vllm.max_images_per_prompt if self.engine.name == "vllm" else None
        for uid in dict.fromkeys(t.uid for t in trajectories):
            inputs[uid] = teacher_inputs(prompts[uid], cfg, self.tokenizer)
            if limit is not None and len(inputs[uid].pos) > limit:  # say which row and which field, up front
                raise ValueError(
                    f"prompt {uid!r}: its teacher prompt shows {len(inputs[uid].pos)} images (the full image and its "
                    f"crops) but teacher.vllm.max_images_per_prompt is {limit}: raise it to the most any row needs"
                )
        t_views = time.perf_counter() - t0

        topk = cfg.loss.teacher_topk if cfg.loss.mode == "forward_kl_topk" else 0
        pos, neg = [], []
        for t in trajectories:
            i = inputs[t.uid]
            pos.append(ScoreRequest(i.prompt_ids, i.pos, t.response_ids, topk=topk))
            neg.append(ScoreRequest(i.prompt_ids, i.neg, t.response_ids))
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
            t.negative_mode = inputs[t.uid].mode_used
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
                "teacher/fallback_negatives": float(
                    sum(1 for v in inputs.values() if v.mode_used != cfg.views.negative_mode)
                ),
            }
        )
        return trajectories, stats

    def ready(self) -> str:
        """Returns once __init__ finished (the driver waits on it); names the engine."""
        return f"gating-{self.rank}: {self.engine.name} ({self.engine.scoring} scoring) on {self.device}"


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
