"""Real runs for the report tests, made once per session (test_report.py and test_browser.py share them): the
embedded default through the CLI (vLLM engines, sequence gate, quiet console), and two in-process runs on the
session's Ray cluster with the transformers engines (token gate; gate disabled)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_config


@dataclass
class CliRun:
    out: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def vllm_run(tmp_path_factory, tiny_model, synth_data) -> CliRun:
    """`vzero train` on the shipped config, as `make run` does it (its own local cluster, vLLM where installed)."""
    out = tmp_path_factory.mktemp("vllm-sequence") / "run"
    cmd = [
        sys.executable, "-m", "vzero.cli", "train", "--config", "configs/tiny-cpu.yaml", "steps=2",
        f"output_dir={out}", f"data.path={synth_data}", "data.synth=null", f"student.path={tiny_model}",
        "student.build=null", "rollout.max_tokens=8",
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return CliRun(out, res.stdout, res.stderr)


@pytest.fixture(scope="session")
def hf_runs(ray_local, tmp_path_factory, tiny_model, synth_data) -> dict[str, Path]:
    from vzero.driver import train

    runs = {}
    for name, extra in {"token": ["gate.level=token"], "off": ["gate.enabled=false"]}.items():
        base = tmp_path_factory.mktemp(f"hf-{name}")
        cfg = tiny_config(
            base, tiny_model, synth_data,
            "rollout.engine=transformers", "teacher.engine=transformers", "rollout.num_samplers=1", "steps=2",
            "rollout.prompts_per_step=2", "rollout.n=3", *extra,
        )  # fmt: skip
        train(cfg)
        runs[name] = base / "run"
    return runs


@pytest.fixture(scope="session")
def all_runs(vllm_run, hf_runs) -> dict[str, Path]:
    return {"vllm-sequence": vllm_run.out, "hf-token": hf_runs["token"], "hf-off": hf_runs["off"]}
