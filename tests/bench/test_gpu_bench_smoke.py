"""The GPU benchmark's code paths on CPU (tiny preset): every stage runs and the JSON has every number.

The real numbers come from `python -m bench.gpu` on a GPU machine; this keeps that command from rotting between
GPU sessions.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_gpu_benchmark_smoke_writes_every_measurement(tmp_path) -> None:
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    r = json.loads(out.read_text())
    s = r["stages"]
    for key in ("raw_vllm", "sampler_actor", "transformers_generate"):
        assert s["rollout"][key]["tokens_per_s"] > 0
    assert s["rollout"]["sampler_actor"]["engine"] == "vllm"
    assert (
        s["teacher"]["gating_actor"]["tokens_per_s"] > 0
        and s["teacher"]["raw_vllm_prompt_logprobs"]["tokens_per_s"] > 0
    )
    for stage, pair in (
        ("rollout", ("raw_vllm", "sampler_actor")),
        ("teacher", ("raw_vllm_prompt_logprobs", "gating_actor")),
    ):
        for side in pair:  # interleaved reps on fresh batches, with CPU seconds next to wall seconds
            assert len(s[stage][side]["reps"]) == 1 and s[stage][side]["cpu_seconds"] > 0
    assert s["rollout"]["sampler_vs_raw"] > 0 and s["teacher"]["teacher_vs_raw"] > 0
    assert s["learner"]["learner/tokens_per_s"] > 0
    assert s["push"]["seconds"] > 0 and s["push"]["gb"] > 0 and s["push"]["load_weights_floor"]["seconds"] > 0
    for mode in ("sync", "async"):
        assert s["step"][mode]["step/seconds"] > 0 and s["step"][mode]["slowest_stage_seconds"] > 0
    assert r["command"].startswith("python -m bench.gpu --smoke")
