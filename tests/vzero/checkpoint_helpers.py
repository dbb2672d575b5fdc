"""A checkpoint directory with every file a real one has (vzero/checkpoint.py layout), small tensors, no model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vzero import checkpoint as ckpt


def write_checkpoint(root: Path, step: int) -> Path:
    """Commit checkpoint `step` under `root` (keep_last large: nothing is pruned) and return its directory."""
    tmp = ckpt.begin(root, step)
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    save_file({"w": torch.full((4, 4), float(step))}, str(tmp / "model" / "model.safetensors"))
    save_file({"0.exp_avg": torch.zeros(4)}, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps({"param_groups": [], "scalars": {}, "version": step}))
    save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "policy_version": step}))
    return ckpt.commit(tmp, keep_last=100)
