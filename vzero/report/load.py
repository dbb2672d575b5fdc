"""Read what a run directory holds, tolerating a run that is still being written.

A run directory is one with a config.yaml or a metrics.jsonl (the driver writes config.yaml before any actor starts).
Everything else is optional: each thing that is missing or unreadable adds a line to `RunData.notes`.

Step numbers are those of metrics.jsonl (`step` = learner updates completed, 1-based); trajectory_log names its files
with the same number, so metrics step k's trajectories are step_00000k.parquet.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from vzero.checkpoint import latest_checkpoint
from vzero.config import ModelSource, TrainConfig
from vzero.errors import UserError
from vzero.metrics_log import VERSIONS_FILE

STEP_FILE = re.compile(r"^step_(\d+)\.parquet$")  # never matches the `.parquet.tmp` of a step being written
TRAJECTORY_COLUMNS = (
    "uid",
    "sample_index",
    "policy_version",
    "response_ids",
    "lp_pos",
    "lp_neg",
    "weight",
    "token_weights",
    "finish_reason",
    "negative_mode",
)


class NotARunError(UserError):
    """The directory holds neither config.yaml nor metrics.jsonl."""


@dataclass
class RunData:
    run_dir: Path
    config: dict[str, Any]  # config.yaml as written (raw: a field added later falls back to today's default)
    config_text: str
    metrics: list[dict[str, Any]]  # one record per step, in step order
    trajectory_files: dict[int, Path]  # metrics step -> trajectories file
    versions: dict[str, str] | None
    checkpoint: Path | None
    notes: list[str] = field(default_factory=list)

    def setting(self, dotted: str) -> Any:
        """A config value by dotted path, or the current default where the run's config.yaml lacks it."""
        for tree in (self.config, _DEFAULTS):
            node: Any = tree
            for key in dotted.split("."):
                if not isinstance(node, dict) or key not in node:
                    break
                node = node[key]
            else:
                return node
        raise KeyError(dotted)

    def teacher_setting(self, key: str) -> Any:
        """A field of the teacher's model source (the student's when teacher.model is unset)."""
        teacher = self.setting("teacher.model")
        if not isinstance(teacher, dict):
            return self.setting(f"student.{key}")
        return teacher.get(key, _MODEL_DEFAULTS[key])

    @property
    def total_steps(self) -> int:
        return int(self.setting("steps"))

    @property
    def finished(self) -> bool:
        return self.checkpoint is not None and bool(self.metrics) and self.metrics[-1]["step"] >= self.total_steps

    def resolve(self, path: str) -> Path | None:
        """A path from the config as it was meant when the run started: absolute, or relative to the directory the
        run was launched from (tried: the current directory, then each parent of the run directory)."""
        p = Path(path)
        if p.is_absolute():
            return p if p.exists() else None
        for base in (Path.cwd(), *self.run_dir.resolve().parents):
            if (base / p).exists():
                return base / p
        return None


_DEFAULTS: dict[str, Any] = TrainConfig().model_dump(mode="json")
_MODEL_DEFAULTS: dict[str, Any] = ModelSource().model_dump(mode="json")


def load_run(run_dir: Path) -> RunData:
    """Everything the report shows about `run_dir`; raises NotARunError when it is not a run directory."""
    run_dir = Path(run_dir)
    config_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not run_dir.is_dir() or not (config_path.is_file() or metrics_path.is_file()):
        raise NotARunError(f"{run_dir} is not a vzero run directory (no config.yaml or metrics.jsonl in it)")
    notes: list[str] = []
    config, text = _read_config(config_path, notes)
    metrics = read_metrics_tolerant(metrics_path, notes)
    files = trajectory_files(run_dir / "trajectories", notes)
    versions = None
    if (run_dir / VERSIONS_FILE).is_file():
        try:
            versions = json.loads((run_dir / VERSIONS_FILE).read_text())
        except ValueError as e:
            notes.append(f"{VERSIONS_FILE} is unreadable ({e})")
    else:
        notes.append(f"no {VERSIONS_FILE}: the run's software versions were not recorded (a run from before it was)")
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    return RunData(run_dir, config, text, metrics, files, versions, checkpoint, notes)


def _read_config(path: Path, notes: list[str]) -> tuple[dict[str, Any], str]:
    if not path.is_file():
        notes.append("no config.yaml: views, gate settings and paths fall back to today's defaults")
        return {}, ""
    text = path.read_text()
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        notes.append(f"config.yaml is not valid YAML ({e}); using today's defaults")
        return {}, text
    if not isinstance(config, dict):
        notes.append("config.yaml holds no mapping; using today's defaults")
        return {}, text
    return config, text


def read_metrics_tolerant(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """Step records of metrics.jsonl (last record of a step wins, as after a resume); unparsable lines are skipped
    with a note (the last line of a running job may be half written)."""
    if not path.is_file():
        notes.append("no metrics.jsonl yet: no curves (the run has not finished a step)")
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            by_step[int(rec["step"])] = rec
        except (ValueError, KeyError, TypeError):
            notes.append(f"metrics.jsonl line {i} is incomplete or not a step record (being written?): skipped")
    return [by_step[k] for k in sorted(by_step)]


def trajectory_files(directory: Path, notes: list[str]) -> dict[int, Path]:
    if not directory.is_dir():
        notes.append("no trajectories/: no histograms or gallery (logging.save_trajectories was off?)")
        return {}
    files = {}
    for p in directory.iterdir():
        m = STEP_FILE.match(p.name)
        if m:
            files[int(m.group(1))] = p
    if not files:
        notes.append("trajectories/ holds no step files yet")
    return dict(sorted(files.items()))


def read_trajectories(path: Path, notes: list[str]) -> pa.Table | None:
    """The step's trajectory rows (report columns only), or None with a note if the file cannot be read."""
    try:
        schema = pq.read_schema(path)
        return pq.read_table(path, columns=[c for c in TRAJECTORY_COLUMNS if c in schema.names])
    except (OSError, pa.ArrowException) as e:
        notes.append(f"{path.name} is unreadable ({e}): skipped")
        return None
