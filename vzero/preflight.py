"""Checks before any actor starts: the data, the model directories, the engines and the resources a job asks for.

`prepare_inputs(cfg)` is what the driver runs first: it builds the demo assets the config asks for (`data.synth`,
`*.build`, via vzero/assets.py), then runs every check and raises ONE `UserError` listing every problem, each naming
its config field and file. Catching them here turns "every engine started, then a traceback" into a one-line message
in seconds. The checks are plain functions returning a list of problems (empty = fine), testable without Ray:

- `check_data`: the file is Parquet with the required columns, and at least `rollout.prompts_per_step` distinct rows
  survive validation (the same `validate_row` the stream uses). Rows are read in file order and reading stops as soon
  as enough usable rows were seen, or after `sample_rows` rows: a huge file costs a bounded sample, and a file whose
  first `sample_rows` rows cannot fill one batch is refused (in practice it is broken).
- `check_model_dir`: config.json (valid JSON with a model_type), safetensors weights that are complete (headers are
  read: a truncated copy or a git-lfs pointer is caught), every shard an index names, tokenizer and processor files.
- `check_engines`: an engine named explicitly is importable.
- `check_local_resources`: a local cluster can hold the actors (a remote cluster is checked after connecting,
  vzero/cluster.py `check_resources`).

Knows nothing about Ray actors, engines' internals or training.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from vzero.config import TrainConfig
from vzero.data import schema as S
from vzero.data.validate import check_duplicate, validate_row
from vzero.errors import UserError

log = logging.getLogger("vzero")

DEFAULT_SAMPLE_ROWS = 2048  # rows read at most to find one batch of usable rows (a few seconds of decoding)
_READ_BATCH = 64
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))  # any one set
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # either one
_LFS_POINTER = b"version https://git-lfs"


@dataclass
class DataSample:
    """What reading the first rows of a dataset found."""

    rows: int  # rows in the file
    read: int = 0  # rows validated
    usable: int = 0  # valid, distinct ids
    reasons: Counter[str] = field(default_factory=Counter)  # quarantine reasons among the rows read

    @property
    def whole_file(self) -> bool:
        return self.read >= self.rows


def sample_data(path: str | os.PathLike[str], *, need: int, max_pixels: int, sample_rows: int) -> DataSample:
    """Validate rows in file order until `need` usable ones are found or `sample_rows` were read.

    Raises `S.DataFileError` if the file, or a page of it, cannot be read."""
    pf = S.open_dataset(path)
    sample = DataSample(rows=pf.metadata.num_rows)
    seen: set[str] = set()
    limit = min(sample_rows, sample.rows)
    batches = pf.iter_batches(batch_size=_READ_BATCH, columns=S.train_columns_in(pf.schema_arrow))
    while sample.usable < need and sample.read < limit:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (OSError, pa.ArrowException) as e:
            raise S.DataFileError(f"{path}: data pages unreadable ({e})") from e
        for raw in batch.to_pylist()[: limit - sample.read]:
            prompt, reason = validate_row(raw, max_pixels=max_pixels)
            if prompt is not None:
                reason = check_duplicate(prompt.uid, seen)
            sample.read += 1
            if reason is not None:
                sample.reasons[reason] += 1
                continue
            sample.usable += 1
            if sample.usable >= need:
                break
    return sample


def check_data(
    path: str | os.PathLike[str],
    *,
    need: int,
    max_pixels: int,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    field_name: str = "data.path",
) -> list[str]:
    """Problems that make `path` unable to supply one batch of `need` prompts (empty list = usable)."""
    where = f"{field_name} {str(path)!r}"
    if not Path(path).is_file():
        return [f"{where} does not exist or is not a file"]
    try:
        sample = sample_data(path, need=need, max_pixels=max_pixels, sample_rows=sample_rows)
    except S.DataFileError as e:
        return [f"{field_name}: {e}"]
    reasons = ", ".join(f"{k}: {v}" for k, v in sample.reasons.most_common(4)) or "none"
    if sample.usable < need:
        scope = f"its {sample.rows} rows" if sample.whole_file else f"the first {sample.read} of its {sample.rows} rows"
        return [
            f"{where}: only {sample.usable} of {scope} are usable, but rollout.prompts_per_step={need} needs "
            f"{need} distinct usable rows per step (quarantine reasons: {reasons}; `vzero data check {path}` lists "
            "them all)"
        ]
    if sample.reasons:
        _warn_once(
            f"{where}: {sum(sample.reasons.values())} of the first {sample.read} rows will be quarantined ({reasons}); "
            "see quarantine.parquet in the run's output"
        )
    return []


_WARNED: set[str] = set()  # the CLI and the driver both run the checks: say each thing once per process


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def check_model_dir(path: str | os.PathLike[str], *, field_name: str) -> list[str]:
    """Problems with a HF-format model directory: config, safetensors weights, tokenizer, processor."""
    d = Path(path)
    where = f"{field_name} {str(path)!r}"
    if not d.is_dir():
        return [f"{where}: model directory does not exist (only local directories are loaded)"]
    problems = []
    config = d / "config.json"
    if not config.is_file():
        problems.append(f"{where}: no config.json (is this a HF-format model directory?)")
    else:
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (ValueError, AttributeError) as e:
            problems.append(f"{where}: config.json is not a JSON object ({e})")
        else:
            if not model_type:
                problems.append(f"{where}: config.json has no model_type")
    problems += _weight_problems(d, where)
    names = {p.name for p in d.iterdir()}
    if not any(all(f in names for f in group) for group in TOKENIZER_FILES):
        options = " or ".join("+".join(g) for g in TOKENIZER_FILES)
        problems.append(f"{where}: no tokenizer files ({options})")
    if not any(f in names for f in PROCESSOR_FILES):
        problems.append(f"{where}: no image processor config ({' or '.join(PROCESSOR_FILES)})")
    return problems


def _weight_problems(d: Path, where: str) -> list[str]:
    files = sorted(d.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in d.iterdir())
        pickled = any(n.endswith(".bin") for n in found)
        hint = " (pickle weights only: convert them, see vzero/models/loading.py)" if pickled else ""
        return [f"{where}: no *.safetensors weights{hint}; found {found}"]
    problems = []
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as e:
            problems.append(f"{where}: {index.name} is unreadable ({e})")
        else:
            missing = sorted(s for s in shards if not (d / s).is_file())
            if missing:
                problems.append(f"{where}: {index.name} names shard(s) that are missing: {missing}")
    for f in files:
        reason = safetensors_problem(f)
        if reason:
            problems.append(f"{where}: {f.name} {reason}")
    return problems


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be complete weights (from its header and size), or None."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if head + fh.read(len(_LFS_POINTER) - 8) == _LFS_POINTER:
            return "is a git-lfs pointer, not the weights (run `git lfs pull` in the model repository)"
        if len(head) < 8:
            return f"is truncated ({size} bytes)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"is truncated or not safetensors (header of {n} bytes in a {size}-byte file)"
        fh.seek(8)
        try:
            header = json.loads(fh.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            return f"has an unreadable header ({e})"
    if 8 + n + end > size:
        return f"is truncated ({size} bytes; its header needs {8 + n + end})"
    return None


def check_engines(cfg: TrainConfig) -> list[str]:
    """An engine named explicitly must be importable (`auto` falls back to transformers)."""
    if importlib.util.find_spec("vllm") is not None:
        return []
    return [
        f"{name}.engine: 'vllm' is not importable here (install vllm, or set {name}.engine=transformers)"
        for name, engine in (("rollout", cfg.rollout.engine), ("teacher", cfg.teacher.engine))
        if engine == "vllm"
    ]


def check_local_resources(cfg: TrainConfig, *, cpus: float | None = None, gpus: float | None = None) -> list[str]:
    """A local cluster (no ray.address) must fit every actor; `cpus`/`gpus` default to the config or the machine."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return []  # a cluster we join is checked against what it reports, after connecting
    from vzero.cluster import requested_resources

    want = requested_resources(cfg)
    if cpus is None:
        cpus = cfg.ray.num_cpus if cfg.ray.num_cpus is not None else os.cpu_count() or 1
    if gpus is None:  # torch is imported (seconds) only when a GPU is asked for and the count is not configured
        gpus = cfg.ray.num_gpus if cfg.ray.num_gpus is not None else _gpu_count() if want["GPU"] > 0 else 0
    have = {"CPU": cpus, "GPU": gpus}
    setting = {"CPU": "ray.num_cpus", "GPU": "ray.num_gpus"}
    return [
        f"resources: the actors request {n:g} {kind} but the local cluster has {have[kind]:g} ({setting[kind]}); "
        "lower rollout.num_samplers / teacher.num_actors / *.resources, or raise " + setting[kind]
        for kind, n in want.items()
        if n > have[kind] + 1e-9
    ]


def _ray_already_up() -> bool:
    """True when this process already holds a Ray connection: `cluster.connect` then reuses it as it is."""
    ray = sys.modules.get("ray")  # never import Ray (seconds) just to ask
    return ray is not None and ray.is_initialized()


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def preflight_problems(cfg: TrainConfig) -> list[str]:
    """Every problem the checks find for `cfg` (data and models must exist already)."""
    # A Ray this process already runs is reused as it is (`cluster.connect`): `cluster.check_resources` checks it.
    problems = check_engines(cfg) + ([] if _ray_already_up() else check_local_resources(cfg))
    problems += check_data(cfg.data.path, need=cfg.rollout.prompts_per_step, max_pixels=cfg.data.max_image_pixels)
    problems += check_model_dir(cfg.student.path, field_name="student.path")
    if cfg.teacher.model is not None and cfg.teacher.model.path != cfg.student.path:
        problems += check_model_dir(cfg.teacher.model.path, field_name="teacher.model.path")
    return problems


def prepare_inputs(cfg: TrainConfig) -> None:
    """Build the assets the config asks for, then check everything; raise one UserError listing every problem."""
    from vzero.assets import ensure_data, ensure_model

    for what, build in (
        ("data.path", lambda: ensure_data(cfg.data)),
        ("student.path", lambda: ensure_model(cfg.student)),
        ("teacher.model.path", lambda: ensure_model(cfg.teacher_model)),
    ):
        try:
            build()
        except FileNotFoundError as e:  # missing and nothing to build it from: the checks below say what is wrong
            log.debug("%s: %s", what, e)
    problems = preflight_problems(cfg)
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} problems found before starting:\n" + "\n".join(f"  {p}" for p in problems))
