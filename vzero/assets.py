"""Make the embedded default self-contained: synthesise the dataset and build random-init models when asked.

Only acts when the config says how (`data.synth`, `*.build`) and the target does not exist yet; real datasets and
model directories are never touched. Runs in the driver before any actor starts.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from vzero.config import DataConfig, ModelSource

log = logging.getLogger("vzero")


def ensure_data(data: DataConfig) -> Path:
    path = Path(data.path)
    if path.exists():
        return path
    if data.synth is None:
        raise FileNotFoundError(
            f"data.path {str(path)!r} does not exist (set data.synth to generate the synthetic task there)"
        )
    from vzero.data.synth import write_synth

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # concurrent runs never see a half-written file
    write_synth(tmp, n=data.synth.n, seed=data.synth.seed, image_size=data.synth.image_size)
    os.replace(tmp, path)
    log.info("synthesised %d rows at %s", data.synth.n, path)
    return path


def ensure_model(model: ModelSource) -> Path:
    path = Path(model.path)
    if (path / "config.json").is_file():
        return path
    if model.build is None:
        raise FileNotFoundError(
            f"model directory {str(path)!r} has no config.json (point the path at a HF-format model, or set "
            "`build` to create a random-init one)"
        )
    from vzero.models.tiny import build_model

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    build_model(tmp, arch=model.build.arch, preset=model.build.preset, seed=model.build.seed)
    try:
        os.replace(tmp, path)
    except OSError:  # another process built it first (same seed, same model)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built a random-init %s/%s model at %s", model.build.arch, model.build.preset, path)
    return path
