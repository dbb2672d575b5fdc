"""The report's figures as PNG bytes (matplotlib, Agg backend: no display needed).

`curve_figures(metrics)`: one small line plot per panel of `CURVES` (a panel whose keys the run never logged is left
out and named in the returned notes). `histogram_figures(tables, ...)`: per chosen step, the distribution of gate
weights (one per trajectory), of per-token Δ, and of token weights at gate level token. Knows nothing about HTML.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files only, whatever display the machine has

import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
from matplotlib.ticker import MaxNLocator

# panel name -> (title, [(metrics key, legend label)])
CURVES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "loss": ("Loss", [("loss", "loss")]),
    "gate_weight": (
        "Gate weight",
        [
            ("gate/weight_mean", "mean"),
            ("gate/weight_min", "min"),
            ("gate/weight_max", "max"),
            ("gate_would/weight_mean", "mean the gate would apply (gate off)"),
        ],
    ),
    "at_w_min": (
        "Share of weights at w_min",
        [("gate/frac_at_w_min", "at w_min"), ("gate_would/frac_at_w_min", "at w_min (gate off)")],
    ),
    # With the gate off the teacher's contrast is still computed and logged under gate_would/*: plot it all the same.
    "delta_mean": (
        "Mean Δ per token (lp_pos − lp_neg)",
        [("gate/delta_mean", "mean Δ"), ("gate_would/delta_mean", "mean Δ (gate off)")],
    ),
    "delta_pos": (
        "Share of tokens with Δ > 0",
        [("gate/frac_delta_pos", "Δ > 0"), ("gate_would/frac_delta_pos", "Δ > 0 (gate off)")],
    ),
    "tokens_per_s": (
        "Tokens per second",
        [("rollout/tokens_per_s", "rollout"), ("teacher/tokens_per_s", "teacher"), ("learner/tokens_per_s", "learner")],
    ),
    "weight_push": ("Weight push (s)", [("weight_push/seconds", "push")]),
    "staleness": ("Staleness (policy versions)", [("staleness", "staleness")]),
    "quarantined": ("Quarantined rows (so far)", [("data/quarantined", "rows")]),
}


@dataclass
class Figure:
    name: str  # file stem
    title: str
    png: bytes


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _number(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else np.nan


def curve_figures(metrics: list[dict[str, Any]]) -> tuple[list[Figure], list[str]]:
    """One figure per `CURVES` panel the run logged; notes name the panels it did not."""
    figures, missing = [], []
    steps = [m["step"] for m in metrics]
    for name, (title, series) in CURVES.items():
        present = [(k, label) for k, label in series if any(k in m for m in metrics)]
        if not present:
            missing.append(title)
            continue
        fig, ax = plt.subplots(figsize=(3.8, 2.5))  # 380 px: three panels per row
        for key, label in present:
            ys = [_number(m.get(key)) for m in metrics]
            ax.plot(steps, ys, marker="o", markersize=3, linewidth=1.4, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(present) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        figures.append(Figure(name, title, _png(fig)))
    notes = [f"metrics.jsonl has no values for: {', '.join(missing)}"] if missing and metrics else []
    return figures, notes


def _deltas(table: pa.Table) -> np.ndarray:
    pos, neg = table.column("lp_pos").to_pylist(), table.column("lp_neg").to_pylist()
    parts = [
        np.asarray(p, dtype=np.float64) - np.asarray(n, dtype=np.float64)
        for p, n in zip(pos, neg, strict=True)
        if p and n
    ]
    return np.concatenate(parts) if parts else np.empty(0)


def histogram_figures(tables: dict[int, pa.Table], *, w_min: float, w_max: float) -> list[Figure]:
    """Gate weight / Δ / token weight histograms, one subplot per step (steps in `tables` order)."""
    if not tables:
        return []
    weights = {s: np.asarray(t.column("weight").to_pylist(), dtype=float) for s, t in tables.items()}
    series = {
        "weights": ("Gate weight per trajectory", weights),
        "delta": ("Δ per token (lp_pos − lp_neg)", {s: _deltas(t) for s, t in tables.items()}),
    }
    token_w = {
        s: np.concatenate([np.asarray(w, float) for w in t.column("token_weights").to_pylist() if w] or [np.empty(0)])
        for s, t in tables.items()
        if "token_weights" in t.column_names
    }
    if any(v.size for v in token_w.values()):
        series["token_weights"] = ("Gate weight per token (gate level token)", token_w)
    figures = []
    for name, (title, per_step) in series.items():
        n = len(per_step)
        fig, axes = plt.subplots(1, n, figsize=(min(3.0 * n, 12), 2.5), sharey=False, squeeze=False)
        for ax, (step, values) in zip(axes[0], per_step.items(), strict=True):
            values = values[np.isfinite(values)]
            if values.size:
                ax.hist(values, bins=min(30, max(5, values.size // 2)), color="#4c72b0", alpha=0.85)
            if name != "delta":
                for x, style in ((1.0, "-"), (w_min, ":"), (w_max, ":")):
                    ax.axvline(x, color="#555", linestyle=style, linewidth=0.8)
            else:
                ax.axvline(0.0, color="#555", linewidth=0.8)
            ax.set_title(f"step {step} (n={values.size})", fontsize=9)
            ax.tick_params(labelsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        figures.append(Figure(name, title, _png(fig)))
    return figures
