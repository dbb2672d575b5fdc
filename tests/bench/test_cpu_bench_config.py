"""The CPU benchmark measures the embedded default's actor layout at the sizes its docstring and README state.

Invariant: `bench.cpu`'s config is `configs/tiny-cpu.yaml` with only sizes and output locations changed, so its
ratios describe what `vzero train --config configs/tiny-cpu.yaml` runs (the full benchmark itself takes minutes and
runs by hand; its stage code is exercised in CI by the GPU benchmark's CPU smoke test, which shares it).
"""

from __future__ import annotations

from pathlib import Path

from bench.cpu import _args, _config
from tests.conftest import REPO
from vzero.config import load_config


def test_cpu_benchmark_keeps_the_embedded_layout_at_the_stated_sizes(tmp_path: Path) -> None:
    a = _args(["--out", str(tmp_path / "x.json")])
    cfg = _config(a, tmp_path / "model", tmp_path / "data.parquet", tmp_path / "run", mode="async")
    shipped = load_config(REPO / "configs/tiny-cpu.yaml", [])
    assert (a.preset, a.prompts, a.n, a.max_tokens, a.image_size) == ("small", 8, 8, 32, 224)
    assert (cfg.rollout.prompts_per_step, cfg.rollout.n, cfg.rollout.max_tokens) == (8, 8, 32)
    assert cfg.student.max_pixels == 224 * 224 and cfg.mode == "async"
    for role in ("rollout", "teacher", "learner"):  # the actor layout is the shipped one
        assert getattr(cfg, role).resources == getattr(shipped, role).resources
    assert cfg.rollout.num_samplers == shipped.rollout.num_samplers and cfg.ray.num_cpus == shipped.ray.num_cpus
    assert cfg.rollout.vllm == shipped.rollout.vllm and cfg.teacher.vllm == shipped.teacher.vllm
    over = _config(_args(["--out", "x", "rollout.num_samplers=1"]), tmp_path, tmp_path, tmp_path)
    assert over.rollout.num_samplers == 1, "extra key=value overrides reach the config"
