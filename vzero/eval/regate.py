"""Offline re-gating: the gate recomputed from a finished run's logged teacher log-probs, for a grid of settings.

Every step of a run writes its trajectories, with the teacher's per-token log-probs under both views, to
`RUN_DIR/trajectories/step_*.parquet` (`vzero.trajectory_log`). The gate is a pure function of those numbers
(`gating.gate.evidence_weights`), so any other α, γ, bounds or level can be evaluated WITHOUT a model or a teacher.

`regate(run_dir, grid, labels=None)` returns one row per `Setting` (plus an `as run` row: the weights the run
applied, the `weight` column):
- weights, pooled over all steps at the level's granularity (trajectories for `sequence`, valid tokens for `token`):
  mean, std (population), min, max, share at w_min, share at w_max; the score S (or s) mean/std;
- mean Δ = lp+ − lp- and share Δ > 0 over valid tokens (the same for every setting: they are the data);
- with `labels` (a Parquet with `id` + `answer`, read by `vzero.eval.evaluate.read_answers`, the one answer reader):
  every response is decoded with the run's student tokenizer and compared to its prompt's answer exactly as
  `vzero eval` scores (`normalize_answer`); reported are the share of correct samples, the mean trajectory weight of
  correct and of wrong samples and the AUC of weight vs correctness (Mann-Whitney, ties count half: 1 = every
  correct sample outweighs every wrong one, 0.5 = no separation). A token-level setting's trajectory weight is the
  mean of its token weights, as the gating actor records it. Samples whose uid has no label are counted, not scored.

Groups are the trajectories of one step sharing a uid, as in training. Training never calls this; with labels it is
evaluation only. Bad input raises `RegateError` with a one-line message naming the file and the problem.
Evaluation tooling sits above `gating/` (like the recipes): nothing in the training path imports it.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from gating.gate import GATE_LEVELS, evidence_weights

REQUIRED_COLUMNS = ("uid", "response_ids", "lp_pos", "lp_neg")


class RegateError(ValueError):
    """The run directory, a trajectory file or the labels file cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Setting:
    """One gate setting to evaluate (the fields of `GateConfig` that shape the weights)."""

    alpha: float = 0.5
    gamma: float = 1.0
    w_min: float = 0.0
    w_max: float = 2.0
    level: str = "sequence"


def make_grid(
    alphas: list[float], gammas: list[float], w_mins: list[float], w_maxs: list[float], levels: list[str]
) -> list[Setting]:
    """The cartesian product, refusing settings the gate would refuse (negative α/γ, w_min > w_max, bad level)."""
    grid = []
    for a, g, lo, hi, lvl in itertools.product(alphas, gammas, w_mins, w_maxs, levels):
        if a < 0 or g < 0 or lo < 0:
            raise RegateError(f"alpha, gamma and w_min must be >= 0 (got alpha={a}, gamma={g}, w_min={lo})")
        if lo > hi:
            raise RegateError(f"w_min ({lo}) must be <= w_max ({hi})")
        if lvl not in GATE_LEVELS:
            raise RegateError(f"level must be one of {GATE_LEVELS}, got {lvl!r}")
        grid.append(Setting(a, g, lo, hi, lvl))
    return grid


@dataclass
class StepData:
    """One step file as tensors: [B, T] teacher log-probs and mask, group ids, responses, applied weights."""

    path: Path
    uids: list[str]
    response_ids: list[list[int]]
    lp_pos: torch.Tensor
    lp_neg: torch.Tensor
    mask: torch.Tensor
    applied: list[float | None]


def trajectory_files(run_dir: Path) -> list[Path]:
    """The run's trajectories/step_*.parquet in step order; a clear `RegateError` when there are none."""
    if not run_dir.is_dir():
        raise RegateError(f"{run_dir}: no such run directory")
    files = sorted((run_dir / "trajectories").glob("step_*.parquet"))
    if not files:
        raise RegateError(
            f"{run_dir}: no trajectories (expected trajectories/step_*.parquet; the run needs "
            "logging.save_trajectories=true)"
        )
    return files


def read_step(path: Path) -> StepData:
    """One trajectory file, checked: the needed columns exist and every row's log-probs match its response."""
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowException) as e:
        raise RegateError(f"{path}: cannot read as Parquet ({e})") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise RegateError(f"{path}: column(s) {missing} missing (file has {names})")
    cols = [*REQUIRED_COLUMNS, *(["weight"] if "weight" in names else [])]
    rows = pq.read_table(path, columns=cols).to_pylist()
    if not rows:
        raise RegateError(f"{path}: no rows")
    T = 0
    for i, r in enumerate(rows):
        for c in ("lp_pos", "lp_neg"):
            if r[c] is None or r["response_ids"] is None or len(r[c]) != len(r["response_ids"]):
                have = "null" if r[c] is None else f"{len(r[c])} values"
                raise RegateError(
                    f"{path}: row {i} (uid {r['uid']!r}): {c} has {have} for {len(r['response_ids'] or [])} "
                    "response tokens"
                )
        T = max(T, len(r["response_ids"]))
    pos, neg, mask = (torch.zeros(len(rows), T, dtype=torch.float64) for _ in range(3))
    for i, r in enumerate(rows):
        k = len(r["response_ids"])
        pos[i, :k], neg[i, :k], mask[i, :k] = torch.tensor(r["lp_pos"]), torch.tensor(r["lp_neg"]), 1.0
    return StepData(
        path, [r["uid"] for r in rows], [r["response_ids"] for r in rows], pos, neg, mask,
        [r.get("weight") for r in rows],
    )  # fmt: skip


def weights_for(step: StepData, s: Setting) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(values at the level's granularity, one weight per trajectory, evidence_weights' diagnostics)."""
    w, diag = evidence_weights(
        step.lp_pos, step.lp_neg, step.mask, step.uids, gamma=s.gamma, alpha=s.alpha, w_min=s.w_min, w_max=s.w_max,
        level=s.level,
    )  # fmt: skip
    if s.level == "sequence":
        return w, w, diag
    valid = step.mask != 0
    n = valid.sum(1)
    per_traj = torch.where(n > 0, (w * valid).sum(1) / n.clamp_min(1), torch.ones_like(n, dtype=w.dtype))
    return w[valid], per_traj, diag


def auc(scores: list[float], positive: list[bool]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting half; None without both classes."""
    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(xs):  # average ranks over ties
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _stats(values: np.ndarray, w_min: float | None, w_max: float | None) -> dict[str, float]:
    if values.size == 0:
        return {k: 0.0 for k in ("weight_mean", "weight_std", "weight_min", "weight_max")}
    out = {
        "weight_mean": float(values.mean()),
        "weight_std": float(values.std()),
        "weight_min": float(values.min()),
        "weight_max": float(values.max()),
    }
    if w_min is not None and w_max is not None:
        out["frac_at_w_min"] = float((values <= w_min).mean())
        out["frac_at_w_max"] = float((values >= w_max).mean())
    return out


def student_tokenizer(run_dir: Path, override: Path | None = None) -> Any:
    """The tokenizer the run's samples were drawn with: `override`, else `student.path` of RUN_DIR/config.yaml."""
    from vzero.models.loading import load_processor

    path = override
    if path is None:
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise RegateError(f"{run_dir}: no config.yaml to find the student tokenizer; pass --tokenizer DIR")
        path = Path((yaml.safe_load(cfg_path.read_text()) or {}).get("student", {}).get("path", ""))
    if not path or not Path(path).is_dir():
        raise RegateError(f"student tokenizer directory {str(path)!r} does not exist; pass --tokenizer DIR")
    return load_processor(path).tokenizer


def correctness(steps: list[StepData], labels: Path, tokenizer: Any) -> tuple[list[bool | None], dict[str, Any]]:
    """Per trajectory (all steps, in order): correct / wrong / None (no label for its uid), and counts."""
    from vzero.data.schema import DataFileError
    from vzero.eval.evaluate import normalize_answer, read_answers

    try:
        answers, invalid = read_answers(labels)
    except DataFileError as e:
        raise RegateError(str(e)) from e
    gold = {uid: normalize_answer(a) for uid, a in answers.items()}
    out: list[bool | None] = []
    for st in steps:
        for uid, ids in zip(st.uids, st.response_ids, strict=True):
            g = gold.get(uid)
            out.append(None if g is None else normalize_answer(tokenizer.decode(ids, skip_special_tokens=True)) == g)
    scored = [c for c in out if c is not None]
    info = {
        "labels": str(labels),
        "label_rows": len(answers),
        "label_invalid": dict(invalid),
        "samples_scored": len(scored),
        "samples_unlabelled": len(out) - len(scored),
        "sample_accuracy": sum(scored) / len(scored) if scored else None,
    }
    if not scored:
        raise RegateError(f"{labels}: none of the run's {len(out)} samples has a label (no id matches a run uid)")
    return out, info


def _separation(per_traj: list[float], correct: list[bool | None]) -> dict[str, float | None]:
    pairs = [(w, c) for w, c in zip(per_traj, correct, strict=True) if c is not None]
    right = [w for w, c in pairs if c]
    wrong = [w for w, c in pairs if not c]
    return {
        "weight_correct": statistics.fmean(right) if right else None,
        "weight_wrong": statistics.fmean(wrong) if wrong else None,
        "auc": auc([w for w, _ in pairs], [c for _, c in pairs]),
    }


def regate(
    run_dir: Path, grid: list[Setting], *, labels: Path | None = None, tokenizer_dir: Path | None = None
) -> dict[str, Any]:
    """The table described at the top, as a dict: {run, steps, trajectories, tokens, delta, labels, rows}."""
    steps = [read_step(p) for p in trajectory_files(run_dir)]
    valid = torch.cat([st.mask.reshape(-1) for st in steps]) != 0
    delta = torch.cat([(st.lp_pos - st.lp_neg).reshape(-1) for st in steps])[valid]
    correct, label_info = (None, None)
    if labels is not None:
        correct, label_info = correctness(steps, labels, student_tokenizer(run_dir, tokenizer_dir))
    rows = []
    applied = [w for st in steps for w in st.applied]
    if all(w is not None for w in applied):
        row: dict[str, Any] = {"setting": "as run", **_stats(np.asarray(applied, dtype=np.float64), None, None)}
        if correct is not None:
            row.update(_separation(applied, correct))  # type: ignore[arg-type]
        rows.append(row)
    for s in grid:
        values, per_traj, scores = [], [], []
        for st in steps:
            v, pt, diag = weights_for(st, s)
            values.append(v.double().numpy())
            per_traj += pt.tolist()
            scores.append((diag["score_mean"], diag["score_std"], v.numel()))
        n = sum(c for _, _, c in scores)
        row = {"setting": asdict(s), **_stats(np.concatenate(values), s.w_min, s.w_max)}
        row["score_mean"] = sum(m * c for m, _, c in scores) / max(1, n)  # pooled over steps, weighted by count
        if correct is not None:
            row.update(_separation(per_traj, correct))
        rows.append(row)
    return {
        "run": str(run_dir),
        "steps": len(steps),
        "trajectories": sum(len(st.uids) for st in steps),
        "tokens": int(valid.sum()),
        "delta_mean": float(delta.mean()) if delta.numel() else 0.0,
        "frac_delta_pos": float((delta > 0).double().mean()) if delta.numel() else 0.0,
        "labels": label_info,
        "rows": rows,
    }


def setting_name(s: dict[str, Any]) -> str:
    """ "sequence α=0.5 γ=1 [0, 2]": a setting as one table cell."""
    return f"{s['level']} α={s['alpha']:g} γ={s['gamma']:g} [{s['w_min']:g}, {s['w_max']:g}]"


def render_markdown(result: dict[str, Any]) -> str:
    """The table of `regate` as markdown (one line per setting)."""
    has_labels = result["labels"] is not None
    head = ["setting", "w mean", "w std", "w min", "w max", "at w_min", "at w_max"]
    if has_labels:
        head += ["w (correct)", "w (wrong)", "AUC"]
    f = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [
        f"# Re-gating of `{result['run']}`",
        "",
        f"{result['steps']} steps, {result['trajectories']} trajectories, {result['tokens']} response tokens; "
        f"mean Δ = lp+ − lp- {result['delta_mean']:+.3f}, share Δ > 0 {result['frac_delta_pos']:.3f}.",
    ]
    if has_labels:
        lab = result["labels"]
        acc = lab["sample_accuracy"]
        lines.append(
            f"Labels `{lab['labels']}`: {lab['samples_scored']} samples scored "
            f"({'n/a' if acc is None else f'{100 * acc:.1f} %'} correct), {lab['samples_unlabelled']} without a label."
        )
    lines += ["", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in result["rows"]:
        s = r["setting"]
        name = s if isinstance(s, str) else setting_name(s)
        cells = [name] + [f(r.get(k)) for k in ("weight_mean", "weight_std", "weight_min", "weight_max")]
        cells += [f(r.get("frac_at_w_min")), f(r.get("frac_at_w_max"))]
        if has_labels:
            cells += [f(r.get(k)) for k in ("weight_correct", "weight_wrong", "auc")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
