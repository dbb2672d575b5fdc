"""Shared fixtures: tiny models and data built once per session, a real local Ray cluster.

Everything is real: models are random-init Qwen-VL of the tiny preset, data is the synthetic task written as Parquet,
Ray is a real local cluster (inside the loopback-only namespace that `make test` sets up).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a stale ~/.ray/auth_token must not break local clusters

REPO = Path(__file__).resolve().parents[1]
# metrics.jsonl keys every step must have: the interface outside tools rely on (issue: the loop on Ray)
INTERFACE_KEYS = frozenset(
    {
        "step",
        "policy_version",
        "loss",
        "gate/weight_mean",
        "rollout/tokens_per_s",
        "teacher/tokens_per_s",
        "weight_push/seconds",
    }
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random-init Qwen2-VL directory (transformers and vLLM both load it)."""
    from vzero.models.tiny import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny-qwen2vl", arch="qwen2_vl", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """32 rows of the synthetic fine-grained task."""
    from vzero.data.synth import write_synth

    path = tmp_path_factory.mktemp("data") / "synth.parquet"
    write_synth(path, n=32, seed=0, image_size=224)
    return path


@pytest.fixture(scope="session")
def bad_rows_10k(tmp_path_factory) -> tuple[Path, dict[int, str]]:
    """10,000 rows, 5 % of them bad in every way the data checks can meet (vzero/data/bad_rows.py), and where."""
    from vzero.data.bad_rows import write_bad_rows_file

    path = tmp_path_factory.mktemp("bad-rows") / "bad-10k.parquet"
    return path, write_bad_rows_file(path, 10_000, bad_fraction=0.05, seed=0)


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


needs_vllm = pytest.mark.skipif(not vllm_importable(), reason="vllm is not importable")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the in-process driver tests (bound to loopback inside `make test`'s netns)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=6,
            include_dashboard=False,
            namespace="vzero-tests",
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray
    ray.shutdown()


def tiny_config(tmp_path: Path, model: Path, data: Path, *overrides: str):
    """The embedded default pointed at session-built assets, small enough for CI; extra key=value overrides win."""
    from vzero.config import load_config

    return load_config(
        REPO / "configs/tiny-cpu.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.path={data}",
            "data.synth=null",
            f"student.path={model}",
            "student.build=null",
            "steps=3",
            "rollout.max_tokens=8",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *overrides,
        ],
    )
