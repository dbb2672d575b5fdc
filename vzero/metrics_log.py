"""Per-step metrics to a JSONL file, TensorBoard and the console.

`metrics.jsonl` gets one JSON object per step (flushed at once: a crash loses nothing already logged). Keys use
`area/name` (e.g. `gate/weight_mean`, `rollout/tokens_per_s`); TensorBoard gets every numeric value under the same
tag. Knows nothing about Ray.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, out_dir: Path, *, tensorboard: bool = True):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self._f = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(out_dir / "tb"))
            except ImportError:  # tensorboard is a declared dependency; keep logging JSONL if it is missing
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(record, sort_keys=False) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        return record

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


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
