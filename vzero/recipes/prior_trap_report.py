"""The prior-trap report: premises, outcome tables (mean ± std over seeds, paired differences), diagnostics, plots.

Reads only the `results` dict that `vzero.recipes.prior_trap.run_prior_trap` assembles; knows nothing about
training. Writes results.md, curves.png (accuracy and P-rate against step, per family) and weights.png (applied
gate weights of P vs non-P samples on trap rows).
"""

from __future__ import annotations

import statistics
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from vzero.recipes.prior_trap_data import CONTROL, TRAP
from vzero.recipes.prior_trap_premises import PREMISE_CHECKS
from vzero.recipes.report import mean_std

pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}"  # noqa: E731
num = lambda x, d=2: "n/a" if x is None else f"{x:.{d}f}"  # noqa: E731

# (key, label, getter of one run's value)
OUTCOMES = (
    ("trap_p_rate", "trap P-rate (P wrong)", lambda r: r["curve"][-1]["p_rate"][TRAP]),
    ("trap_accuracy", "trap accuracy", lambda r: r["curve"][-1]["by_family"][TRAP]),
    ("control_accuracy", "control accuracy", lambda r: r["curve"][-1]["by_family"][CONTROL]),
    ("control_p_rate", "control P-rate", lambda r: r["curve"][-1]["p_rate"][CONTROL]),
)


def _ms(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    d = mean_std([100 * x for x in xs])
    return f"{d['mean']:.1f} ± {d['std']:.1f}"


def paired(runs: dict[str, dict[str, Any]], method: str, ref: str, get) -> dict[str, float] | None:
    """Mean and sample std of the per-seed difference method − ref (points), over the seeds both have."""
    seeds = sorted(set(runs.get(method, {})) & set(runs.get(ref, {})))
    if not seeds:
        return None
    return mean_std([100 * (get(runs[method][s]) - get(runs[ref][s])) for s in seeds])


def verdict(results: dict[str, Any]) -> list[str]:
    """Plain statements computed from the paired differences (a difference counts when |mean| > 2 std / sqrt(n))."""
    runs, lines = results["runs"], []
    get_p, get_c = OUTCOMES[0][2], OUTCOMES[2][2]
    for m in runs:
        ref = "opd-k3" if m == "best-k3" else "opd"
        if m in ("opd", "opd-k3") or not runs[m]:
            continue
        dp, dc = paired(runs, m, ref, get_p), paired(runs, m, ref, get_c)
        if dp is None or dc is None:
            continue

        def call(d: dict[str, float]) -> str:
            if d["n"] < 2:
                return "one seed: no conclusion"
            se = d["std"] / d["n"] ** 0.5
            if abs(d["mean"]) > 2 * se:
                return "beyond 2 standard errors"
            return "within 2 standard errors (no effect shown)"

        lines.append(
            f"- **{m} vs {ref}**: trap P-rate {dp['mean']:+.1f} points (paired std {dp['std']:.1f}, n={dp['n']}: "
            f"{call(dp)}); control accuracy {dc['mean']:+.1f} points (std {dc['std']:.1f}: {call(dc)})."
        )
    return lines


def _premise_lines(prem: dict[str, Any]) -> list[str]:
    t, c, g = prem[TRAP], prem[CONTROL], prem["simulated_gate"]
    s = prem["student_init_greedy"]
    prior = prem["label_prior"]["sft_biased"]
    rows = [
        "| quantity | trap family | control family |",
        "|---|---|---|",
        f"| labels equal to P in the biased SFT set (%) | {pct(prior[TRAP]['share_answer'])} | "
        f"{pct(prior[CONTROL]['share_answer'])} |",
    ]
    for label, key, view in (
        ("teacher p(P), evidence crop", "p_trap", "teacher_crop"),
        ("teacher p(P), negative view", "p_trap", "teacher_neg"),
        ("teacher p(correct), evidence crop", "p_correct", "teacher_crop"),
        ("teacher p(correct), negative view", "p_correct", "teacher_neg"),
        ("teacher argmax = P, evidence crop (%)", "argmax_trap_rate", "teacher_crop"),
        ("teacher argmax = P, negative view (%)", "argmax_trap_rate", "teacher_neg"),
        ("teacher argmax accuracy, evidence crop (%)", "argmax_accuracy", "teacher_crop"),
    ):
        f = pct if "%" in label else num
        rows.append(f"| {label} | {f(t[view][key])} | {f(c[view][key])} |")
    for cls, label in (("trap", "P"), ("correct", "correct"), ("other_wrong", "other wrong")):
        rows.append(
            f"| mean Δ(answer = {label}) = lp+ − lp- (share < 0) | {num(t['delta'][cls]['delta_mean'])} "
            f"({pct(t['delta'][cls]['frac_delta_neg'])} %) | {num(c['delta'][cls]['delta_mean'])} "
            f"({pct(c['delta'][cls]['frac_delta_neg'])} %) |"
        )
    acc, prate = s["by_family"], s["p_rate"]
    rows.append(f"| student at init: greedy accuracy (%) | {pct(acc[TRAP])} | {pct(acc[CONTROL])} |")
    rows.append(f"| student at init: greedy P-rate, P wrong (%) | {pct(prate[TRAP])} | {pct(prate[CONTROL])} |")
    rows.append(
        f"| student at init: p(P), P wrong | {num(t['student_view_scored']['p_trap'])} | "
        f"{num(c['student_view_scored']['p_trap'])} |"
    )
    gate = ["", "| simulated sequence gate on trap rows (groups of n drawn from the student at init) | w(P) | "
            "w(correct) | w(other wrong) | at w_min |", "|---|---|---|---|---|"]  # fmt: skip
    for a, r in g.items():
        gate.append(
            f"| α = {a} | {num(r['weight_trap'])} | {num(r['weight_correct'])} | {num(r['weight_other_wrong'])} | "
            f"{pct(r['frac_at_w_min'])} % |"
        )
    share = next(iter(g.values()))["share"]
    gate.append(
        f"\nShare of simulated samples: P {pct(share['trap'])} %, correct {pct(share['correct'])} %, other wrong "
        f"{pct(share['other_wrong'])} %."
    )
    checks = ["", "| premise | holds |", "|---|---|"]
    checks += [f"| {text} | {'yes' if prem['checks'][k] else '**no**'} |" for k, text in PREMISE_CHECKS]
    return rows + gate + checks


def render_markdown(results: dict[str, Any]) -> str:
    """results.md: verdict, premises, outcome tables (mean ± std over seeds), paired differences against OPD and the
    gate diagnostics, from the `run_prior_trap` results dict."""
    plan, runs = results["plan"], results["runs"]
    head = "| method | seeds | " + " | ".join(label + " (%)" for _, label, _ in OUTCOMES) + " | wall per run (s) |"
    table = [head, "|---" * (len(OUTCOMES) + 3) + "|"]
    base = results["premises"]["student_init_greedy"]
    table.append(
        f"| student at init | | {pct(base['p_rate'][TRAP])} | {pct(base['by_family'][TRAP])} | "
        f"{pct(base['by_family'][CONTROL])} | {pct(base['p_rate'][CONTROL])} | |"
    )
    for m, per in runs.items():
        cells = [_ms([get(r) for r in per.values()]) for _, _, get in OUTCOMES]
        wall = mean_std([r["wall_seconds"] for r in per.values()]) if per else None
        wall_cell = "" if wall is None else f"{wall['mean']:.0f}"
        table.append(f"| {m} | {len(per)} | " + " | ".join(cells) + f" | {wall_cell} |")
    diffs = ["| method | reference | " + " | ".join(f"Δ {label}" for _, label, _ in OUTCOMES[:3]) + " |"]
    diffs.append("|---" * 5 + "|")
    for m in runs:
        ref = "opd-k3" if m == "best-k3" else "opd"
        if m in ("opd", "opd-k3"):
            continue
        cells = []
        for _, _, get in OUTCOMES[:3]:
            d = paired(runs, m, ref, get)
            cells.append("n/a" if d is None else f"{d['mean']:+.1f} ± {d['std']:.1f}")
        diffs.append(f"| {m} | {ref} | " + " | ".join(cells) + " |")
    first = next(r for per in runs.values() for r in per.values())
    steps = [p["step"] for p in first["curve"]]
    curve = []
    for key, label, _ in OUTCOMES:  # each outcome against step; the getters read the last point, these every point
        fam, field = (TRAP if key.startswith("trap") else CONTROL), ("p_rate" if "p_rate" in key else "by_family")
        curve += [f"{label} (%):", "", "| method | " + " | ".join(f"step {s}" for s in steps) + " |"]
        curve.append("|---" * (len(steps) + 1) + "|")
        for m, per in runs.items():
            if per:
                pts = [statistics.fmean(r["curve"][i][field][fam] for r in per.values()) for i in range(len(steps))]
                curve.append(f"| {m} | " + " | ".join(pct(x) for x in pts) + " |")
        curve.append("")
    diag = [
        "| method | samples P / correct / other (%) | applied w: P | correct | other | at w_min | gate α=1 w: P | "
        "correct | other | sampled P share, first → last 10 steps (%) | grad cosine gate vs ones | grad norm ratio |",
        "|---" * 13 + "|",
    ]
    for m, per in runs.items():
        ds = [r["diagnostics"] for r in per.values()]
        if not ds:
            continue

        def cls(d, c, key):
            return d["classes"][TRAP][c][key]

        counts = [_over(ds, lambda d, c=c: cls(d, c, "samples")) or 0 for c in ("trap", "correct", "other")]
        shares = " / ".join(f"{100 * x / max(1, sum(counts)):.0f}" for x in counts)
        cells = [shares]
        cells += [num(_over(ds, lambda d, c=c: cls(d, c, "applied"))) for c in ("trap", "correct", "other")]
        cells.append(pct(_over(ds, lambda d: d["frac_at_w_min"])) + " %")
        cells += [num(_over(ds, lambda d, c=c: cls(d, c, "gate_a1"))) for c in ("trap", "correct", "other")]
        cells += [
            f"{pct(_over(ds, lambda d: _p_share(d, slice(0, 10))))} → "
            f"{pct(_over(ds, lambda d: _p_share(d, slice(-10, None))))}",
            num(_over(ds, lambda d: _avg([g["cosine"] for g in d["gradients"]])), 3),
            num(_over(ds, lambda d: _avg([g["norm_ratio"] for g in d["gradients"]])), 3),
        ]
        diag.append(f"| {m} | " + " | ".join(cells) + " |")
    mech = [
        "| method | reward r: P | correct | other | share r < 0 (%): P | correct | other | applied w·r: P | correct | "
        "other |",
        "|---" * 10 + "|",
    ]
    for m, per in runs.items():
        ds = [r["diagnostics"] for r in per.values() if "version" in r["diagnostics"]]
        if not ds:
            continue
        cells = []
        for key, f in (("reward", num), ("frac_reward_negative", pct), ("advantage", num)):
            cells += [
                f(_over(ds, lambda d, c=c, k=key: d["classes"][TRAP][c][k])) for c in ("trap", "correct", "other")
            ]
        mech.append(f"| {m} | " + " | ".join(cells) + " |")
    missing = results.get("missing_runs") or []
    missing_note = [f"**Runs not finished, not in the tables: {', '.join(missing)}.**", ""] if missing else []
    prem_note = (
        "All premises hold."
        if not results["premises_failed"]
        else f"**Premises that fail: {', '.join(results['premises_failed'])}** (the comparison ran anyway)."
    )
    return "\n".join(
        [
            "# Prior trap: does the evidence gate stop OPD from copying the teacher's prior?",
            "",
            f"Command: `{results['command']}` ({results['machine']}; {results['total_seconds'] / 60:.1f} min in all, "
            "reused pieces not counted again).",
            "",
            f"Setup: colour rows only; control question vs trap question, P = `{plan['trap_answer']}`. Teacher = a "
            f"Qwen2-VL `{plan['preset']}` fine-tuned on evidence crops with clean labels ({plan['teacher_steps']} "
            f"steps), then {plan['bias_steps']} more steps with {pct(plan['bias_rate'])} % of the trap rows' labels "
            "replaced by P. Student = the checkpoint before the biased phase, on its window view "
            f"({plan['context']} x the target side, {plan['student_pixels']} px). Label-free: {plan['steps']} steps x "
            f"{plan['prompts_per_step']} prompts x n = {plan['n']}, lr {plan['lr']}, seeds {plan['seeds']} planned "
            "(finished per method: the `seeds` column), "
            f"{plan['n_eval']} held-out rows, greedy. Best gated k1 method for the k3 comparison: "
            f"`{results['best_gate_for_k3']}` (lowest final trap P-rate).",
            "",
            *missing_note,
            "## Premises (held-out rows whose answer is not P; measured before the runs)",
            "",
            prem_note,
            "",
            *_premise_lines(results["premises"]),
            "",
            "## Outcome after the last step (mean ± sample std over seeds)",
            "",
            *table,
            "",
            "## Paired differences against OPD (points, mean ± std over seeds; best-k3 against opd-k3)",
            "",
            *diffs,
            "",
            *verdict(results),
            "",
            "## Accuracy and P-rate against step, per family (held-out rows, seed mean)",
            "",
            *curve,
            "![accuracy and P-rate vs step](curves.png)",
            "",
            "## Gate diagnostics (trap rows whose answer is not P; means over steps and seeds)",
            "",
            "Samples: the run's sampled answers on those rows, by class (P / the correct colour / another wrong "
            "colour). Applied = the weights the run used (1 under OPD; the mean token weight under the token gate). "
            "Gate α=1 = what the sequence gate at α = 1 gives the same samples (recomputed from the logged teacher "
            "log-probs, the same rule for every method). Gradient columns: cosine between the "
            "gradient of the run's loss with the gate's weights (ungated runs: the α = 1 sequence gate's) and with "
            "all weights 1, and the ratio of their norms, at every checkpoint's step.",
            "",
            *diag,
            "",
            "![weights of P vs non-P samples](weights.png)",
            "",
            "What the loss does with those weights (k1-PG: per-sample reward r = Σ_t clamp(lp+ − lp_s, ±10) from the "
            "logged log-probs; the advantage is w·r). r < 0 means the student already gives the answer more "
            "probability than the crop teacher: the step pushes it DOWN, and a smaller weight pushes it down less.",
            "",
            *mech,
            "",
            "![P samples: reward and applied weight vs step](mechanism.png)",
            "",
        ]
    )


def _over(ds: list[dict[str, Any]], f) -> float | None:
    """Mean of f(d) over the runs' diagnostics that have a value."""
    return _avg([f(d) for d in ds])


def _p_share(d: dict[str, Any], sl: slice) -> float | None:
    return _avg([x["trap_p_share"] for x in d["per_step"][sl]])


def _avg(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals else None


def write_plots(out: Path, results: dict[str, Any]) -> None:
    """curves.png (accuracy and trap P-rate against step, per family and method) and weights.png (gate weight
    distributions of P vs non-P samples) in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    panels = (
        ("trap P-rate, P wrong (%)", lambda p: p["p_rate"][TRAP]),
        ("trap accuracy (%)", lambda p: p["by_family"][TRAP]),
        ("control accuracy (%)", lambda p: p["by_family"][CONTROL]),
        ("control P-rate, P wrong (%)", lambda p: p["p_rate"][CONTROL]),
    )
    for ax, (label, get) in zip(axes, panels, strict=True):
        for m, per in runs.items():
            curves = [r["curve"] for r in per.values()]
            if not curves:
                continue
            steps = [p["step"] for p in curves[0]]
            y = np.array([[100 * get(p) for p in c] for c in curves])
            mean, std = y.mean(0), y.std(0, ddof=1) if len(y) > 1 else np.zeros(y.shape[1])
            ax.plot(steps, mean, marker="o", ms=3, label=m)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.12)
        ax.set_xlabel("label-free step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Prior trap: held-out, student view, greedy; mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    gated = [m for m, per in runs.items() if per and m not in ("opd", "opd-k3")]
    fig, axes = plt.subplots(1, max(1, len(gated)), figsize=(3.2 * max(1, len(gated)), 3.2), squeeze=False)
    for ax, m in zip(axes[0], gated, strict=False):
        hs = [r["diagnostics"]["histogram"] for r in runs[m].values()]
        edges = np.array(hs[0]["edges"])
        for key, label in (("p", "P samples"), ("non_p", "non-P samples")):
            counts = np.sum([h[key] for h in hs], axis=0).astype(float)
            ax.stairs(counts / max(1.0, counts.sum()), edges, label=label)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("applied weight")
    axes[0][0].set_ylabel("share of samples (trap rows)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "weights.png", dpi=110)
    plt.close(fig)


def write_mechanism_plot(out: Path, results: dict[str, Any], window: int = 5) -> None:
    """Mean (over seeds, `window`-step running mean) reward and applied weight of the P samples on trap rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for m, per in results["runs"].items():
        ds = [r["diagnostics"] for r in per.values() if "version" in r["diagnostics"]]
        if not ds:
            continue
        for ax, key in zip(axes, ("trap_p_reward", "trap_p_weight"), strict=True):
            rows = [[x[key] for x in d["per_step"]] for d in ds]
            T = min(len(r) for r in rows)
            y = np.array([[np.nan if v is None else v for v in r[:T]] for r in rows], dtype=float)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a step without P samples in every seed
                mean = np.nanmean(y, axis=0)
            ok = np.isfinite(mean)  # running mean over the steps that had P samples
            k = np.ones(window)
            num_ = np.convolve(np.where(ok, mean, 0.0), k, mode="valid")
            den = np.convolve(ok.astype(float), k, mode="valid")
            smooth = np.where(den > 0, num_ / np.maximum(den, 1), np.nan)
            ax.plot(np.arange(len(smooth)) + window - 1, smooth, label=m)
    axes[0].axhline(0, c="gray", lw=0.8)
    axes[0].set_ylabel("reward r of P samples (trap rows, P wrong)")
    axes[1].set_ylabel("applied weight of P samples")
    for ax in axes:
        ax.set_xlabel("label-free step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "mechanism.png", dpi=110)
    plt.close(fig)


def write_report(out: Path, results: dict[str, Any]) -> None:
    """Every report file (plots and results.md) in `out`; results.json is written by the caller."""
    write_plots(out, results)
    write_mechanism_plot(out, results)
    (out / "results.md").write_text(render_markdown(results))
