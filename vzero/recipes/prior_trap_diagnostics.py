"""Gate diagnostics of one prior-trap run, from what the run wrote (evaluation only: reads the labels).

`run_diagnostics(run, train, trap_answer, pixels)` returns, over all the run's logged trajectories:
- per class of sampled answer on TRAP rows whose answer is not P (`trap` = the sample said P, `correct`, `other`
  wrong) and on control rows: the number of samples, the mean APPLIED weight (the `weight` column: 1 under OPD,
  the shuffled weight under the shuffled control, the mean token weight under the token gate) and the mean weight
  the sequence gate at α = 1 WOULD give (recomputed by `vzero.eval.regate`, the same for every method);
- the share of applied weights at w_min (trajectories; valid tokens for the token gate);
- per class also k1-PG's reward r = Σ_t clamp(lp+ − lp_s, ±10) of the samples (lp_s: the sampler's log-probs), the
  share with r < 0 and the mean applied advantage w·r: the gate multiplies a SIGNED reward, so down-weighting a
  sample the student already over-produces (r < 0) weakens the push that would correct it;
- per step: the share of samples saying P on trap rows (P wrong), their accuracy, and the mean reward and applied
  weight of the P samples: the training-time P-rate and what drives it;
- histograms (20 bins over [w_min, w_max]) of the applied weights of P and of non-P samples on trap rows;
- `gradients`: at every checkpoint k that has a logged step k, the cosine between the gradient of the run's loss on
  step k's trajectories with the gate's weights (applied ones; for ungated runs the α = 1 sequence gate's) and with
  all weights 1, and the ratio of their norms: does the gate turn the step or only scale it?

Responses are decoded with the run's student tokenizer and scored like `vzero eval` (`normalize_answer`).
Knows nothing about Ray or the driver.
"""

from __future__ import annotations

import inspect
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

from vzero.data import schema as S
from vzero.eval.evaluate import normalize_answer, read_answers
from vzero.eval.regate import Setting, read_step, student_tokenizer, trajectory_files, weights_for
from vzero.recipes.prior_trap_data import CONTROL, TRAP

CLASSES = ("trap", "correct", "other")
BINS = 20
VERSION = 2  # of the cached diagnostics.json; an older cache is recomputed (its gradient cosines are kept)


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def run_diagnostics(run: Path, train: Path, trap_answer: str, pixels: int) -> dict[str, Any]:
    """Gate weights, k1 rewards and advantages per family and answer class, per-step P shares and the gradient cosines
    of one finished run (module docstring), from its logged trajectories; cached in `run/diagnostics.json`."""
    cache = run / "diagnostics.json"
    earlier = json.loads(cache.read_text()) if cache.exists() else {}
    if earlier.get("version") == VERSION:
        return earlier
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    gate = cfg["gate"]
    w_min, w_max = float(gate["w_min"]), float(gate["w_max"])
    tok = student_tokenizer(run)
    answers, _ = read_answers(train)
    gold = {u: normalize_answer(a) for u, a in answers.items()}
    sources = _column_map(train, S.SOURCE)
    p = normalize_answer(trap_answer)
    applied: dict[str, dict[str, list[float]]] = {f: {c: [] for c in CLASSES} for f in (TRAP, CONTROL)}
    would: dict[str, dict[str, list[float]]] = {f: {c: [] for c in CLASSES} for f in (TRAP, CONTROL)}
    reward: dict[str, dict[str, list[float]]] = {f: {c: [] for c in CLASSES} for f in (TRAP, CONTROL)}
    at_min, per_step = [], []
    token_level = gate["enabled"] and gate["level"] == "token"
    for path in trajectory_files(run):
        st = read_step(path)
        _, w1, _ = weights_for(st, Setting(alpha=1.0, gamma=float(gate["gamma"]), w_min=w_min, w_max=w_max))
        tw = pq.read_table(path, columns=["token_weights"]).column(0).to_pylist() if token_level else None
        lp_old = pq.read_table(path, columns=["lp_old"]).column(0).to_pylist()
        said_p, right, p_reward, p_weight = [], [], [], []
        for i, (uid, ids) in enumerate(zip(st.uids, st.response_ids, strict=True)):
            fam, ans = sources.get(uid), normalize_answer(tok.decode(ids, skip_special_tokens=True))
            if fam not in applied or gold[uid] == p:
                continue
            cls = "trap" if ans == p else "correct" if ans == gold[uid] else "other"
            applied[fam][cls].append(float(st.applied[i]))
            would[fam][cls].append(float(w1[i]))
            # k1-PG's reward for this sample, r = Σ_t (lp+ − lp_s) with each token clamped at ±10 as in the loss
            # (lp_s = the sampler's log-prob: the policy that drew it); the advantage the loss uses is w·r.
            k = len(ids)
            r = float(torch.clamp(st.lp_pos[i, :k].float() - torch.tensor(lp_old[i]), -10, 10).sum())
            reward[fam][cls].append(r)
            if fam == TRAP:
                said_p.append(ans == p)
                right.append(ans == gold[uid])
                if ans == p:
                    p_reward.append(r)
                    p_weight.append(float(st.applied[i]))
        at_min += [x <= w_min for row in tw for x in row] if tw else [float(w) <= w_min for w in st.applied]
        step = int(path.stem.split("_")[1])
        per_step.append(
            {
                "step": step,
                "trap_p_share": _mean(said_p),
                "trap_accuracy": _mean(right),
                "trap_p_reward": _mean(p_reward),
                "trap_p_weight": _mean(p_weight),
            }
        )
    edges = np.linspace(w_min, w_max, BINS + 1)
    trap_p, trap_non_p = applied[TRAP]["trap"], applied[TRAP]["correct"] + applied[TRAP]["other"]
    out = {
        "classes": {
            fam: {
                c: {
                    "samples": len(applied[fam][c]),
                    "applied": _mean(applied[fam][c]),
                    "gate_a1": _mean(would[fam][c]),
                    "reward": _mean(reward[fam][c]),
                    "frac_reward_negative": _mean([float(x < 0) for x in reward[fam][c]]),
                    "advantage": _mean([w * x for w, x in zip(applied[fam][c], reward[fam][c], strict=True)]),
                }
                for c in CLASSES
            }
            for fam in (TRAP, CONTROL)
        },
        "trap_weight_p": _mean(trap_p),
        "trap_weight_non_p": _mean(trap_non_p),
        "frac_at_w_min": _mean([float(x) for x in at_min]),
        "per_step": per_step,
        "histogram": {
            "edges": edges.tolist(),
            "p": np.histogram(np.clip(trap_p, w_min, w_max), edges)[0].tolist(),
            "non_p": np.histogram(np.clip(trap_non_p, w_min, w_max), edges)[0].tolist(),
        },
        "gradients": earlier["gradients"] if "gradients" in earlier else gradient_cosines(run, train, pixels),
        "version": VERSION,
    }
    cache.write_text(json.dumps(out))
    return out


def _column_map(path: Path, column: str) -> dict[str, Any]:
    table = pq.read_table(path, columns=[S.ID, column])
    return dict(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))


def gradient_cosines(run: Path, train: Path, pixels: int) -> list[dict[str, float]]:
    """cos(∇L_gate, ∇L_ones) and |∇L_gate| / |∇L_ones| at each checkpoint with a logged step (see top)."""
    from learner.losses import gated_opd_loss
    from vzero.batching import length_mask, pad_ragged
    from vzero.images import decode_rgb
    from vzero.logprobs import response_logprobs
    from vzero.models.loading import load_model, load_processor
    from vzero.vlm_inputs import ImageEncoder, collate

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    gate, loss_cfg = cfg["gate"], cfg["loss"]
    # The loss options of the config that are keyword options of the loss (others, like loss.old_logprobs, are not).
    accepted = {n for n, p in inspect.signature(gated_opd_loss).parameters.items() if p.kind is p.KEYWORD_ONLY}
    loss_kw = {k: v for k, v in loss_cfg.items() if k in accepted and k != "teacher_topk"}
    if loss_kw.get("mode") == "forward_kl_topk":
        return []  # needs the teacher's top-k, which these runs do not log
    images = _column_map(train, S.IMAGE)
    out = []
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        k = int(ckpt.name.split("_")[1])
        path = run / "trajectories" / f"step_{k:06d}.parquet"
        if not path.exists():  # the final checkpoint: no step was sampled with it
            continue
        st = read_step(path)
        rows = pq.read_table(path, columns=["prompt_ids", "token_weights"]).to_pylist()
        if gate["enabled"] and gate["level"] == "token":
            w = pad_ragged([r["token_weights"] for r in rows])
        elif gate["enabled"]:
            w = torch.tensor(st.applied, dtype=torch.float32)
        else:
            w = weights_for(st, Setting(1.0, float(gate["gamma"]), float(gate["w_min"]), float(gate["w_max"])))[1]
        processor = load_processor(ckpt / "model")
        model = load_model(ckpt / "model", dtype="float32").train()
        enc = ImageEncoder(processor.image_processor, min_pixels=pixels, max_pixels=pixels)
        cache = {u: enc(decode_rgb(images[u])) for u in dict.fromkeys(st.uids)}
        tok = processor.tokenizer
        batch = collate(
            [(r["prompt_ids"], cache[u], ids) for r, u, ids in zip(rows, st.uids, st.response_ids, strict=True)],
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            image_pad_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        )
        params = [q for q in model.parameters() if q.requires_grad]
        lp = response_logprobs(model, batch).logprobs
        mask = length_mask([len(x) for x in st.response_ids])
        # Old log-probs = the current ones (ratio exactly 1, as the learner's recompute gives on its first update).
        old, teacher = lp.detach(), st.lp_pos.float()
        flat = []
        for weights, retain in ((w.float(), True), (torch.ones_like(w, dtype=torch.float32), False)):
            loss, _ = gated_opd_loss(lp, old, teacher, mask, weights, **loss_kw)
            gs = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
            flat.append(
                torch.cat(
                    [(g if g is not None else torch.zeros_like(q)).reshape(-1) for g, q in zip(gs, params, strict=True)]
                )
            )
        g_w, g_1 = flat
        n_w, n_1 = float(g_w.norm()), float(g_1.norm())
        cos = float(g_w @ g_1) / (n_w * n_1) if n_w > 0 and n_1 > 0 else None
        out.append({"step": k, "cosine": cos, "norm_ratio": n_w / n_1 if n_1 > 0 else None})
    return out
