"""The toy reproduction's report: verdict against OPD, markdown table, accuracy-vs-step plot.

Reads only the `results` dict that `vzero.recipes.toy.run_toy` assembles; knows nothing about training.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from vzero.models.families import get_family


def mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


# -- the whole recipe ---------------------------------------------------------------------------------------------


# -------------------------------------------------------------------------------------------------------
def verdict(results: dict[str, Any]) -> list[str]:
    """Plain-language comparisons against OPD: paired per-seed differences and whether they exceed the seed spread."""
    runs, lines = results["runs"], []
    for m in ("vzero-seq", "vzero-token"):
        seeds = sorted(set(runs[m]) & set(runs["opd"]))
        diffs = [100 * (runs[m][s]["final"] - runs["opd"][s]["final"]) for s in seeds]
        if not diffs:
            continue
        d = mean_std(diffs)
        spread = 100 * max(results["summary"][k]["accuracy"]["std"] for k in (m, "opd"))
        if len(diffs) < 2:
            call = "one seed only: no conclusion possible"
        elif abs(d["mean"]) <= max(d["std"], spread):
            call = "no difference beyond the seed spread"
        else:
            call = "the gate helps" if d["mean"] > 0 else "the gate hurts"
        lines.append(
            f"- **{m} vs opd**: {d['mean']:+.1f} points (paired over {len(diffs)} seeds, std {d['std']:.1f}; "
            f"largest per-method seed std {spread:.1f}) → {call}."
        )
    return lines


GATE_KEYS = (
    "gate/weight_mean",
    "gate/frac_at_w_min",
    "gate/frac_delta_pos",
    "gate/delta_mean",
    "sample_accuracy",
    "weight_correct",
    "weight_wrong",
)


def _mean_of(per_seed: dict[str, dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in per_seed.values() if r[key] is not None]
    return statistics.fmean(values) if values else None


def render_markdown(results: dict[str, Any]) -> str:
    plan, summary, t = results["plan"], results["summary"], results["teacher"]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    rows = [
        "| model | held-out accuracy, student view (%) | wall-clock per run (s) | mean step (s) |",
        "|---|---|---|---|",
        f"| teacher on evidence crops (not a student) | {pct(t['crop_accuracy']['accuracy'])} | | |",
        f"| base student (= teacher on the student view) | {pct(results['base']['accuracy'])} | | |",
    ]
    for m, s in summary.items():
        a, w, st = s["accuracy"], s["wall_seconds"], s["step_seconds"]
        rows.append(
            f"| {m} | {pct(a['mean'])} ± {pct(a['std'])} (n={a['n']}) | {w['mean']:.0f} ± {w['std']:.0f} | "
            f"{st['mean']:.2f} |"
        )
    sources = sorted(results["base"]["by_source"])
    src_rows = ["| model | " + " | ".join(sources) + " |", "|---" * (len(sources) + 1) + "|"]
    src_rows.append(
        "| teacher, crop | " + " | ".join(pct(t["crop_accuracy"]["by_source"][s]["accuracy"]) for s in sources) + " |"
    )
    src_rows.append("| base | " + " | ".join(pct(results["base"]["by_source"][s]["accuracy"]) for s in sources) + " |")
    for m, per in results["runs"].items():
        cells = [pct(statistics.fmean(r["final_by_source"][s]["accuracy"] for r in per.values())) for s in sources]
        src_rows.append(f"| {m} (seed mean) | " + " | ".join(cells) + " |")
    per_seed = ["| method | " + " | ".join(f"seed {s}" for s in plan["seeds"]) + " |"]
    per_seed.append("|---" * (len(plan["seeds"]) + 1) + "|")
    for m, per in results["runs"].items():
        per_seed.append(f"| {m} | " + " | ".join(pct(per[str(s)]["final"]) for s in plan["seeds"]) + " |")
    gate_rows = [
        "| method | mean weight | at w_min | frac. Δ>0 | mean Δ | sampled answers correct | w (correct) | w (wrong) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, per in results["runs"].items():
        g = {k: _mean_of(per, k) for k in GATE_KEYS}
        cells = [f"{g[k]:.3f}" for k in GATE_KEYS[:4]] + [f"{pct(g['sample_accuracy'])} %"]
        cells += ["n/a" if g[k] is None else f"{g[k]:.2f}" for k in ("weight_correct", "weight_wrong")]
        gate_rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(
        [
            "# Toy reproduction: does the evidence gate help label-free distillation?",
            "",
            f"Command: `{results['command']}` ({results['machine']}; {results['total_seconds'] / 60:.1f} min in all).",
            "",
            f"Setup: {get_family(plan.get('arch', 'qwen2_vl')).title} `{plan['preset']}` teacher fine-tuned with "
            "labels on evidence crops "
            f"({plan['teacher_steps']} steps, {plan['teacher_pixels']} px); student = a copy of it on its own view "
            f"(context window {plan['context']} x the target side, {plan['student_pixels']} px; 0 = whole image); "
            f"synth {plan['image_size']} px, {plan['n_train']} train / {plan['n_eval']} held-out rows; label-free "
            f"lr {plan['lr']}, engine `{plan['engine']}`. See results/toy/README.md for why.",
            "",
            f"Held-out accuracy ({plan['n_eval']} rows, greedy, exact match) after {plan['steps']} label-free steps "
            f"of {plan['prompts_per_step']} prompts x {plan['n']} samples each, mean ± sample std over seeds "
            f"{list(plan['seeds'])}:",
            "",
            *rows,
            "",
            "## Verdict (computed from the numbers above)",
            "",
            *verdict(results),
            "",
            "## Per source (final accuracy, %)",
            "",
            *src_rows,
            "",
            "## Per seed (final accuracy, %)",
            "",
            *per_seed,
            "",
            "## Gate diagnostics",
            "",
            "Means over steps and seeds. The first four columns are the logged `gate/*` metrics (for opd the logged "
            "`gate_would/*`: what the gate would have said; weights of 1 were applied). The last three use the "
            "labels, for evaluation only: "
            "the fraction of sampled training answers that were correct, and the mean sequence-gate weight "
            "(recomputed with α=0.5, γ=1 from the logged teacher log-probs) of correct vs wrong samples.",
            "",
            *gate_rows,
            "",
            "![accuracy vs step](accuracy_vs_step.png)",
            "",
        ]
    )


def write_plot(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, per in results["runs"].items():
        curves = [r["curve"] for r in per.values()]
        steps = [p["step"] for p in curves[0]]
        acc = np.array([[100 * p["accuracy"] for p in c] for c in curves])
        mean, std = acc.mean(0), acc.std(0, ddof=1) if len(acc) > 1 else np.zeros(acc.shape[1])
        ax.plot(steps, mean, marker="o", label=f"{m} (n={len(curves)})")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.axhline(100 * results["teacher"]["crop_accuracy"]["accuracy"], ls="--", c="gray", label="teacher on crops")
    ax.set_xlabel("label-free training step")
    ax.set_ylabel("held-out accuracy, student view (%)")
    ax.set_title("Toy V-Zero reproduction: mean ± std over seeds")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
