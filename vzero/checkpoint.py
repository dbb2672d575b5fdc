"""Checkpoints that survive crashes: HF-format model (safetensors), optimizer and RNG, written atomically.

Layout of one checkpoint (`<output_dir>/checkpoints/step_000042/`):
  model/                  save_pretrained (safetensors) + the tokenizer/processor files: a usable HF model dir
  optimizer.safetensors   every optimizer state tensor, keyed "<param index>.<state key>"
  optimizer.json          param groups and non-tensor state
  rng.safetensors         torch CPU (+ CUDA) generator states
  trainer_state.json      step, policy version, data-stream position, Python/NumPy RNG (written by the driver)
  rollouts.json           async only: the sampled trajectories of steps still in flight (`save_rollouts`)
  COMPLETE                written last
The directory is assembled as `step_000042.tmp-<pid>` and renamed into place only when complete, so a crash mid-write
leaves a `.tmp-*` directory that `latest_checkpoint` never picks up. A checkpoint of a step that already has one is
renamed in before the old copy is deleted (the old copy waits as `step_000042.old-<pid>`, which `latest_checkpoint`
also accepts), so a crash at any point leaves at least one complete copy. Steps are ordered by number, never by
name. Nothing is pickled: loading a checkpoint cannot run code.

A marked directory can still be damaged later (a copy cut short, a file deleted, a disk error). `problems` checks one
cheaply (the file list, every JSON file parses, every safetensors header and size, no tensor data is read) and
`latest_valid_checkpoint` walks back from the newest, skipping a damaged one with a warning that names it and what is
wrong: a resume then continues from the newest checkpoint that can really be loaded. `remove_partial` deletes the
`.tmp-*` directories of writes a crash interrupted (a resumed run calls it; one run owns one checkpoints directory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vzero import fault_points

log = logging.getLogger("vzero")

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_OLD_DIR = re.compile(r"^step_(\d{6,})\.old-\d+$")  # the previous copy of a step while its new copy moves in
_TMP_DIR = re.compile(r"^step_(\d{6,})\.tmp-\d+$")  # a checkpoint being written (or whose writer died)
ROLLOUTS_FILE = "rollouts.json"
# What every checkpoint holds besides its model weights (model/*.safetensors, checked from config and index).
REQUIRED_FILES = (
    "COMPLETE",
    "trainer_state.json",
    "optimizer.json",
    "optimizer.safetensors",
    "rng.safetensors",
    "model/config.json",
)
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def begin(root: Path, step: int) -> Path:
    """A fresh temporary directory for checkpoint `step` under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{step_dir_name(step)}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def writing(root: Path, step: int) -> Iterator[Path]:
    """`begin` a checkpoint of `step`; if the block fails (a full disk, a dead learner), its temporary directory is
    deleted: it can never be loaded, and its space is wanted back. The block ends with `commit`."""
    tmp = begin(root, step)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_step(path: Path) -> int:
    """The step number of a checkpoint directory (`step_000042` or its `.old-*` copy)."""
    m = _STEP_DIR.match(path.name) or _OLD_DIR.match(path.name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint directory (step_NNNNNN)")
    return int(m.group(1))


def commit(tmp: Path, keep_last: int) -> Path:
    """Mark complete, rename into place (atomic on one filesystem), prune old checkpoints (the newest by number)."""
    (tmp / "COMPLETE").write_text("ok\n")
    final = tmp.with_name(tmp.name.split(".tmp-")[0])
    previous = None
    if final.exists():  # rename-then-delete: the old copy stays complete on disk until the new one is in place
        previous = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, previous)
        fault_points.reached("commit", checkpoint_step(final))
    os.replace(tmp, final)
    if previous is not None:
        shutil.rmtree(previous)
    root = final.parent
    steps = sorted(
        (p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "COMPLETE").exists()), key=checkpoint_step
    )
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    kept = {checkpoint_step(p) for p in steps[-keep_last:]}
    for stale in (p for p in root.iterdir() if _OLD_DIR.match(p.name)):  # left by a crash after the rename
        if checkpoint_step(stale) in kept or checkpoint_step(stale) < min(kept):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (temporary or unmarked directories are ignored; at equal steps
    the regular directory wins over an `.old-*` copy a crash left behind)."""
    if not root.is_dir():
        return None
    done = [
        p for p in root.iterdir() if (_STEP_DIR.match(p.name) or _OLD_DIR.match(p.name)) and (p / "COMPLETE").is_file()
    ]
    return max(done, key=lambda p: (checkpoint_step(p), bool(_STEP_DIR.match(p.name))), default=None)


def problems(directory: Path) -> list[str]:
    """What makes a checkpoint directory unloadable (empty: it looks complete). Cheap: reads the JSON files and the
    safetensors headers, compares every file's size with what its header promises; reads no tensor data."""
    from vzero.preflight import safetensors_problem

    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        return [f"missing {', '.join(missing)}"]
    step = checkpoint_step(directory)
    out = []
    for name in ("trainer_state.json", "optimizer.json", "model/config.json", ROLLOUTS_FILE):
        path = directory / name
        if name == ROLLOUTS_FILE and not path.exists():
            continue  # only async checkpoints with steps in flight have one
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            out.append(f"{name} is unreadable ({type(e).__name__}: {e})")
            continue
        if name == "trainer_state.json" and (not isinstance(content, dict) or content.get("step") != step):
            out.append(f"{name} does not hold step {step}")
    model = directory / "model"
    weights = sorted(model.glob("*.safetensors")) if model.is_dir() else []
    index = model / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError) as e:
            out.append(f"model/{index.name} is unreadable ({e})")
        else:
            out += [f"model/{s} (named by the index) is missing" for s in sorted(shards) if not (model / s).is_file()]
    elif not weights:
        out.append("model/ holds no *.safetensors weights")
    for path in [*weights, directory / "optimizer.safetensors", directory / "rng.safetensors"]:
        reason = safetensors_problem(path)
        if reason:
            out.append(f"{path.relative_to(directory)} {reason}")
    return out


def latest_valid_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint that passes `problems`; every newer damaged one is skipped with a warning."""
    if not root.is_dir():
        return None
    done = [
        p for p in root.iterdir() if (_STEP_DIR.match(p.name) or _OLD_DIR.match(p.name)) and (p / "COMPLETE").is_file()
    ]
    for path in sorted(done, key=lambda p: (checkpoint_step(p), bool(_STEP_DIR.match(p.name))), reverse=True):
        found = problems(path)
        if not found:
            return path
        log.warning("checkpoint %s is damaged and is skipped: %s", path, "; ".join(found))
    return None


def remove_partial(root: Path) -> list[Path]:
    """Delete the temporary directories of checkpoint writes that never finished (a crash, a full disk)."""
    removed = [p for p in root.iterdir() if _TMP_DIR.match(p.name)] if root.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def save_rollouts(directory: Path, jobs: list[dict]) -> None:
    """The in-flight steps' sampled trajectories (JSON: floats round-trip exactly), so a resumed async run trains
    exactly what the uninterrupted one would have (those batches were sampled by weights no checkpoint holds)."""
    (directory / ROLLOUTS_FILE).write_text(json.dumps(jobs))


def load_rollouts(directory: Path) -> list[dict]:
    """What `save_rollouts` wrote ([] for a checkpoint without steps in flight)."""
    path = directory / ROLLOUTS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def copy_processor_files(source_model: Path, model_dir: Path) -> None:
    """Make a saved model dir complete (vLLM / transformers can load it): the tokenizer and processor files."""
    for name in PROCESSOR_FILES:
        src = source_model / name
        if src.is_file():
            shutil.copy2(src, model_dir / name)


def save_training_state(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, source_model: str, version: int
) -> None:
    """Model + optimizer + torch RNG into `directory` (which the caller created)."""
    model_dir = directory / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    copy_processor_files(Path(source_model), model_dir)
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in state["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = val
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(
        json.dumps({"param_groups": state["param_groups"], "scalars": scalars, "version": version})
    )
    save_file(_rng_tensors(), str(directory / "rng.safetensors"))


def read_training_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """The checkpoint's full model and optimizer state keyed by parameter name (what
    `torch.distributed.checkpoint.state_dict.set_state_dict(full_state_dict=True)` takes, e.g. to load this
    world-size-1 layout into sharded learner ranks), and its version. The optimizer's parameters are the model's
    trainable ones in `named_parameters` order (how the learner builds it)."""
    from vzero.models.loading import load_model

    full_model = load_model(directory / "model", dtype="float32", device="cpu").state_dict()
    meta = json.loads((directory / "optimizer.json").read_text())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state: dict[str, dict] = {}
    for key, val in [*load_file(str(directory / "optimizer.safetensors")).items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(names[int(idx)], {})[name] = val
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in meta["param_groups"]]
    return full_model, {"state": state, "param_groups": groups}, int(meta["version"])


def load_training_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Inverse of `save_training_state`; returns the saved policy version.

    The model is re-read through transformers (the same name mapping `save_pretrained` used) and copied in with
    `strict=True`: a silently skipped tensor would make a resumed run diverge.
    """
    from vzero.models.loading import load_model

    saved = load_model(directory / "model", dtype="float32", device="cpu")
    model.load_state_dict(saved.state_dict(), strict=True)
    del saved
    meta = json.loads((directory / "optimizer.json").read_text())
    flat = load_file(str(directory / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, val in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    for key, val in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    rng = load_file(str(directory / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"torch_cuda_{i}" in rng:
                torch.cuda.set_rng_state(rng[f"torch_cuda_{i}"], i)
    return int(meta["version"])
