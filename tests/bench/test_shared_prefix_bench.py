"""The shared-prefix benchmark's code paths at tiny sizes: every row is measured, agrees with the reference, and lands
in the JSON with its command (the real numbers: bench/results/shared-prefix-cpu.json and the GPU bench's stage)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, needs_vllm

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TINY = "--preset tiny --prompts 1 --n 2 --max-tokens 8 --image-tokens 16 --reps 1 --sweep-prompts 1"


@needs_vllm
def test_shared_prefix_benchmark_writes_every_row(tmp_path) -> None:
    out = tmp_path / "sp.json"
    args = [*TINY.split(), "--sweep-image-tokens", "16", "--sweep-n", "2", "--out", str(out)]
    res = subprocess.run(
        [sys.executable, "-m", "bench.shared_prefix", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-5000:]
    r = json.loads(out.read_text())
    t, lr = r["teacher"], r["learner"]
    for row in ("raw_vllm_prompt_logprobs", "vllm_shared_prefix", "transformers_per_request"):
        assert t[row]["tokens_per_s"] > 0 and t[row]["max_abs_diff_vs_transformers_per_request"] < 1e-4
    for row in ("transformers_shared_prefix_cache", "transformers_shared_prefix_packed"):
        assert t[row]["tokens_per_s"] > 0 and t[row]["max_abs_diff_vs_transformers_per_request"] < 1e-4
    assert t["vllm_shared_over_raw_vllm"] > 0 and t["best_shared_over_raw_vllm"] > 0
    for row in ("unshared", "shared_prefix_cache", "shared_prefix_packed"):
        assert lr[row]["seconds"] > 0 and lr[row]["abs_loss_diff_vs_unshared"] < 1e-5
    assert r["sweep"]["image_tokens"]["16"]["learner_unshared_over_shared"] > 0
    assert r["sweep"]["n"]["2"]["teacher_vllm_shared_over_raw_vllm"] > 0
    assert r["command"].startswith("python -m bench.shared_prefix --preset tiny")
