"""The premises of the prior-trap experiment, measured before any comparison run (evaluation only: reads answers).

The experiment can only show the gate's mechanism if (vzero-method.md, "Why a toy can fail to show the gate"):
1. the teacher says the trap answer P with modest probability on the evidence crop and with higher probability on
   the negative view, on trap rows where P is wrong: Δ(P) = lp+(P) − lp-(P) < 0 while Δ(correct) > 0;
2. the student does not carry the prior (its P-rate at init is near the control family's) and speaks the format;
3. the gate, group-normalised over n samples the student would actually draw, gives P samples LOWER weights than
   correct ones (Δ < 0 alone is not enough: the weight is relative to the group's other samples).

`answer_table(model_dir, data, view, pixels, candidates)` scores every candidate answer (its tokens + `<|im_end|>`,
teacher-forced, exactly the tokens the gate sees for a sampled answer) under one view (`crop` = the precomputed
evidence crop, `neg` = the precomputed negative view, `full` = the student's window) and returns per-row, per-candidate,
per-token log-probs. `premises(...)` turns those tables into the numbers reported in results (`PREMISE_CHECKS` are the
pass/fail lines). `simulated_gate(...)` draws groups of n answers from the student's init distribution and runs the
real `evidence_weights` on the teacher's per-token log-probs of those answers.

Knows nothing about Ray or the driver.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vzero.eval.evaluate import iter_labeled, normalize_answer
from vzero.images import decode_rgb
from vzero.logprobs import response_logprobs
from vzero.models.loading import load_model, load_processor
from vzero.recipes.prior_trap_data import CONTROL, FAMILY_NAMES, TRAP
from vzero.recipes.sft import IM_END
from vzero.views import resize_to_budget
from vzero.vlm_inputs import ImageEncoder, chat_prompt_ids, collate

View = Literal["crop", "neg", "full"]


@dataclass
class AnswerTable:
    """Per-token log-probs of every candidate answer for every row, under one view."""

    ids: list[str]
    sources: list[str]
    gold: list[int]  # index of the row's answer in `candidates` (-1: not a candidate)
    candidates: list[str]
    token_lp: torch.Tensor  # [N, K, T] log p of each candidate's tokens (answer tokens, then <|im_end|>); 0 = padding
    token_mask: torch.Tensor  # [K, T] bool, real tokens of each candidate

    @property
    def seq_lp(self) -> torch.Tensor:
        """[N, K] log p of the whole candidate response."""
        return (self.token_lp * self.token_mask).sum(-1)

    def probs(self) -> torch.Tensor:
        """[N, K] candidate probabilities (unnormalised: the rest of the mass is on non-candidate responses)."""
        return self.seq_lp.exp()


def _view_image(prompt: Any, view: View, max_pixels: int):
    if view == "full":
        return decode_rgb(prompt.image)
    images = prompt.pos_images if view == "crop" else prompt.neg_images  # the recipe's rows carry one crop each
    if not images:
        raise ValueError(f"row {prompt.uid}: no precomputed {'pos_images' if view == 'crop' else 'neg_images'}")
    return resize_to_budget(decode_rgb(images[0]), max_pixels=max_pixels)


@torch.no_grad()
def answer_table(
    model_dir: Path,
    data: Path,
    *,
    view: View,
    pixels: int,
    candidates: list[str],
    limit: int | None = None,
    device: str = "cpu",
    batch_rows: int = 16,
) -> AnswerTable:
    """Teacher-forced log-probs of each candidate answer (+ <|im_end|>) for each valid row of `data` (see top)."""
    processor = load_processor(model_dir)
    tok = processor.tokenizer
    model = load_model(model_dir, dtype="float32", device=device)
    encoder = ImageEncoder(processor.image_processor, min_pixels=pixels, max_pixels=pixels)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    end = tok.convert_tokens_to_ids(IM_END)
    cand_ids = [[*tok.encode(c, add_special_tokens=False), end] for c in candidates]
    T = max(len(c) for c in cand_ids)
    mask = torch.zeros(len(candidates), T, dtype=torch.bool)
    for k, c in enumerate(cand_ids):
        mask[k, : len(c)] = True
    rows = [r for r in iter_labeled(data, limit=limit) if not isinstance(r, str)]
    norm = [normalize_answer(c) for c in candidates]
    out = torch.zeros(len(rows), len(candidates), T)
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start : start + batch_rows]
        seqs = []
        for r in chunk:
            enc = encoder(_view_image(r.prompt, view, pixels))
            prompt_ids = chat_prompt_ids(tok, r.prompt.question)
            seqs += [(prompt_ids, enc, c) for c in cand_ids]
        res = response_logprobs(model, collate(seqs, pad_id=pad_id, image_pad_id=image_pad).to(device))
        lp = res.logprobs.float().cpu().view(len(chunk), len(candidates), -1)
        out[start : start + len(chunk), :, : lp.shape[-1]] = lp
    gold = [norm.index(normalize_answer(r.answer)) if normalize_answer(r.answer) in norm else -1 for r in rows]
    return AnswerTable(
        ids=[r.prompt.uid for r in rows],
        sources=[r.prompt.source or "unknown" for r in rows],
        gold=gold,
        candidates=list(candidates),
        token_lp=out * mask,
        token_mask=mask,
    )


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def view_stats(table: AnswerTable, trap_index: int, family: str) -> dict[str, float | None]:
    """On `family` rows whose answer is not P: mean p(P), argmax-P rate, argmax accuracy, mean p(correct)."""
    p = table.probs()
    rows = [i for i, s in enumerate(table.sources) if s == family and table.gold[i] not in (-1, trap_index)]
    top = p.argmax(-1)
    return {
        "rows": len(rows),
        "p_trap": _mean([float(p[i, trap_index]) for i in rows]),
        "argmax_trap_rate": _mean([float(top[i] == trap_index) for i in rows]),
        "argmax_accuracy": _mean([float(top[i] == table.gold[i]) for i in rows]),
        "p_correct": _mean([float(p[i, table.gold[i]]) for i in rows]),
        "candidate_mass": _mean([float(p[i].sum()) for i in rows]),
    }


def delta_stats(pos: AnswerTable, neg: AnswerTable, trap_index: int, family: str, gamma: float = 1.0) -> dict:
    """Δ = lp+ − lp- of whole responses per answer class (P / correct / other wrong), and the gate's score S."""
    if pos.ids != neg.ids:
        raise ValueError("positive and negative tables must cover the same rows in the same order")
    delta_tok = pos.token_lp - neg.token_lp  # [N, K, T]
    s_tok = torch.relu(delta_tok) - gamma * torch.relu(-delta_tok)
    m = pos.token_mask.float()
    S = (s_tok * m).sum(-1) / m.sum(-1)  # [N, K] the sequence score step 3 gives that answer
    D = (delta_tok * m).sum(-1)
    out: dict[str, Any] = {}
    rows = [i for i, s in enumerate(pos.sources) if s == family and pos.gold[i] not in (-1, trap_index)]
    for cls in ("trap", "correct", "other_wrong"):
        d, sc = [], []
        for i in rows:
            if cls == "trap":
                ks = [trap_index]
            elif cls == "correct":
                ks = [pos.gold[i]]
            else:
                ks = [k for k in range(len(pos.candidates)) if k not in (trap_index, pos.gold[i])]
            d += [float(D[i, k]) for k in ks]
            sc += [float(S[i, k]) for k in ks]
        out[cls] = {
            "delta_mean": _mean(d),
            "frac_delta_neg": _mean([float(x < 0) for x in d]),
            "score_mean": _mean(sc),
        }
    return out


def simulated_gate(
    student: AnswerTable,
    pos: AnswerTable,
    neg: AnswerTable,
    trap_index: int,
    *,
    n: int,
    alphas: tuple[float, ...],
    seed: int = 0,
    groups_per_row: int = 4,
) -> dict[str, dict[str, float | None]]:
    """Mean sequence-gate weight per answer class (trap rows, P wrong) over groups of `n` answers drawn from the
    student's candidate distribution at init, with the real `evidence_weights` on the teacher's token log-probs."""
    from gating.gate import evidence_weights

    rng = np.random.default_rng(seed)
    q = student.probs().numpy()
    rows = [i for i, s in enumerate(pos.sources) if s == TRAP and pos.gold[i] not in (-1, trap_index)]
    draws = [(i, rng.choice(q.shape[1], size=n, p=q[i] / q[i].sum())) for i in rows for _ in range(groups_per_row)]
    T = pos.token_lp.shape[-1]
    lp_pos = torch.stack([pos.token_lp[i, ks] for i, ks in draws]).view(-1, T)
    lp_neg = torch.stack([neg.token_lp[i, ks] for i, ks in draws]).view(-1, T)
    mask = torch.stack([pos.token_mask[ks] for _, ks in draws]).view(-1, T)
    groups = [g for g in range(len(draws)) for _ in range(n)]
    cls = []
    for i, ks in draws:
        cls += ["trap" if k == trap_index else "correct" if k == pos.gold[i] else "other_wrong" for k in ks]
    out = {}
    for a in alphas:
        w, diag = evidence_weights(lp_pos, lp_neg, mask, groups, alpha=a, gamma=1.0, w_min=0.0, w_max=2.0)
        wl = w.tolist()
        res: dict[str, float | None] = {
            f"weight_{c}": _mean([x for x, k in zip(wl, cls, strict=True) if k == c])
            for c in ("trap", "correct", "other_wrong")
        }
        res["share"] = {c: cls.count(c) / len(cls) for c in ("trap", "correct", "other_wrong")}  # type: ignore[assignment]
        res["frac_at_w_min"] = diag["frac_at_w_min"]
        out[str(a)] = res
    return out


PREMISE_CHECKS = (
    ("teacher_crop_p_trap_modest", "teacher p(P) on the evidence crop, trap rows with P wrong, is modest (0.1-0.6)"),
    ("teacher_neg_p_trap_higher", "teacher p(P) on the negative view exceeds its p(P) on the crop (trap rows)"),
    ("delta_trap_negative", "mean Δ(P) < 0 on trap rows (the negative view supports P more than the evidence)"),
    ("delta_correct_positive", "mean Δ(correct) > 0 on trap rows"),
    ("student_no_prior", "student P-rate at init on trap rows < 2 x its P-rate on control rows + 5 points"),
    ("gate_down_weights_trap", "simulated sequence gate (α = 1): mean weight of P samples < that of correct ones"),
)


def premises(
    teacher_crop: AnswerTable,
    teacher_neg: AnswerTable,
    student_view: AnswerTable,
    student_eval: dict[str, Any],
    trap_answer: str,
    *,
    n: int,
) -> dict[str, Any]:
    """All premise numbers plus `checks` {name: bool} (see `PREMISE_CHECKS`)."""
    k = teacher_crop.candidates.index(trap_answer)
    out: dict[str, Any] = {"trap_answer": trap_answer, "candidates": teacher_crop.candidates}
    for fam in FAMILY_NAMES:
        out[fam] = {
            "teacher_crop": view_stats(teacher_crop, k, fam),
            "teacher_neg": view_stats(teacher_neg, k, fam),
            "student_view_scored": view_stats(student_view, k, fam),
            "delta": delta_stats(teacher_crop, teacher_neg, k, fam),
        }
    out["student_init_greedy"] = student_eval
    out["simulated_gate"] = simulated_gate(student_view, teacher_crop, teacher_neg, k, n=n, alphas=(0.5, 1.0, 2.0))
    t, g = out[TRAP], out["simulated_gate"]["1.0"]
    s_trap, s_ctrl = student_eval["p_rate"][TRAP], student_eval["p_rate"][CONTROL]
    out["checks"] = {
        "teacher_crop_p_trap_modest": 0.1 <= (t["teacher_crop"]["p_trap"] or 0) <= 0.6,
        "teacher_neg_p_trap_higher": (t["teacher_neg"]["p_trap"] or 0) > (t["teacher_crop"]["p_trap"] or 0),
        "delta_trap_negative": (t["delta"]["trap"]["delta_mean"] or 0) < 0,
        "delta_correct_positive": (t["delta"]["correct"]["delta_mean"] or 0) > 0,
        "student_no_prior": s_trap < 2 * s_ctrl + 0.05,
        "gate_down_weights_trap": (g["weight_trap"] or 0) < (g["weight_correct"] or 0),
    }
    return out


def family_scores(predictions: list[dict[str, Any]], trap_answer: str) -> dict[str, Any]:
    """From `evaluate(..., return_predictions=True)` rows: accuracy per family and overall, and the P-rate (share of
    greedy answers equal to P on rows whose answer is not P) per family."""
    p = normalize_answer(trap_answer)
    acc: dict[str, list[bool]] = {}
    p_rate: dict[str, list[bool]] = {}
    for r in predictions:
        fam = r["source"] or "unknown"
        pred, gold = normalize_answer(r["prediction"]), normalize_answer(r["answer"])
        acc.setdefault(fam, []).append(pred == gold)
        if gold != p:
            p_rate.setdefault(fam, []).append(pred == p)
    every = [x for v in acc.values() for x in v]
    return {
        "accuracy": sum(every) / max(1, len(every)),
        "by_family": {f: sum(v) / len(v) for f, v in sorted(acc.items())},
        "p_rate": {f: sum(v) / len(v) for f, v in sorted(p_rate.items())},
        "rows": len(every),
    }
