"""Every model family end to end: 3 V-Zero steps through the real driver on a real local Ray cluster, vLLM engines.

One run per family (a tiny random-init student; one sampler, one gating actor, one learner), the Qwen3-VL run with a
Qwen3.5 teacher (another family with the same vocabulary: its prompt follows its own chat template, so the teacher
prompt differs from the student's in more than the image) and a system prompt for the student only. Invariants
checked from what the run writes:
- the loop runs: 3 steps, each pushing a new policy version that the sampler reports;
- the sampler's prompts are `chat_prompt_ids` with the student's chat options;
- the teacher's log-probs are aligned on the response suffix: one per response token, equal (within the teacher
  family's vLLM-vs-transformers tolerance) to a transformers replay of the teacher's own prompt on the positive
  view, recomputed here from the logged trajectory;
- the sampler served the pushed weights: step 1's sampler log-probs match checkpoint 1 under transformers within
  the student family's tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import needs_vllm, tiny_config
from vzero.data.validate import validate_row
from vzero.metrics_log import read_metrics
from vzero.models.families import ARCHS, get_family
from vzero.models.loading import load_processor
from vzero.vlm_inputs import chat_prompt_ids

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.vllm, needs_vllm]
TEACHERS = {"qwen3_vl": "qwen3_5"}  # cross-family teacher (same vocabulary); the others teach themselves
EXTRA = {"qwen3_vl": ["student.chat.system_prompt=Answer with one word."]}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    from vzero.models.tiny import build_model

    root = tmp_path_factory.mktemp("family-models")
    return {arch: build_model(root / arch, arch=arch, seed=0) for arch in ARCHS}


def _pixels(prefix: str, arch: str, tokens_per_side: tuple[int, int]) -> list[str]:
    family = get_family(arch)
    lo, hi = (family.pixels_for_tokens(t) for t in tokens_per_side)
    return [f"{prefix}.min_pixels={lo}", f"{prefix}.max_pixels={hi}"]


def _teacher_replay(cfg, rows: list[dict], data: Path) -> list[list[float]]:
    """Positive-view log-probs of logged responses from a transformers engine on the teacher's own prompt."""
    from gating.teacher import teacher_inputs
    from vzero.engines import ScoreRequest
    from vzero.engines.hf import HFEngine

    teacher = cfg.teacher_model
    engine = HFEngine(teacher.path, min_pixels=teacher.min_pixels, max_pixels=teacher.max_pixels)
    prompts = {}
    for raw in pq.read_table(data).to_pylist():
        prompt, _ = validate_row(raw)
        prompts[prompt.uid] = prompt
    requests = []
    for row in rows:
        inputs = teacher_inputs(prompts[row["uid"]], cfg, engine.tokenizer)
        requests.append(ScoreRequest(inputs.prompt_ids, inputs.pos, row["response_ids"]))
    return [r.logprobs for r in engine.score(requests)]


def _student_replay(model_dir: Path, cfg, rows: list[dict], data: Path) -> list[list[float]]:
    from vzero.engines import ScoreRequest
    from vzero.engines.hf import HFEngine
    from vzero.images import decode_rgb

    s = cfg.student
    engine = HFEngine(str(model_dir), min_pixels=s.min_pixels, max_pixels=s.max_pixels)
    images = {r["id"]: r["image"] for r in pq.read_table(data, columns=["id", "image"]).to_pylist()}
    reqs = [ScoreRequest(r["prompt_ids"], [decode_rgb(images[r["uid"]])], r["response_ids"]) for r in rows]
    return [r.logprobs for r in engine.score(reqs)]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_family_runs_three_vzero_steps_on_vllm(ray_local, family_models, synth_data, tmp_path, arch) -> None:
    from vzero.driver import train

    teacher_arch = TEACHERS.get(arch, arch)
    overrides = [
        "rollout.num_samplers=1",
        "rollout.engine=vllm",
        "teacher.engine=vllm",
        "checkpoint.every=1",
        "checkpoint.keep_last=3",
        f"teacher.model.path={family_models[teacher_arch]}",
        *_pixels("student", arch, (2, 4)),
        *_pixels("teacher.model", teacher_arch, (4, 4)),
        *EXTRA.get(arch, []),
    ]
    cfg = tiny_config(tmp_path, family_models[arch], synth_data, *overrides)
    train(cfg)
    out = Path(cfg.output_dir)
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["sampler/min_version"] for m in metrics] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) for m in metrics)

    # step 2 was sampled with the weights pushed after step 1 (checkpoints/step_000001); files are numbered from 1
    rows = pq.read_table(out / "trajectories" / "step_000002.parquet").to_pylist()[:6]
    student_tok = load_processor(cfg.student.path).tokenizer
    questions = {r["id"]: r["question"] for r in pq.read_table(synth_data, columns=["id", "question"]).to_pylist()}
    for row in rows:
        assert len(row["lp_pos"]) == len(row["lp_neg"]) == len(row["lp_old"]) == len(row["response_ids"]) > 0
        assert row["prompt_ids"] == chat_prompt_ids(student_tok, questions[row["uid"]], cfg.student.chat)
    teacher_atol = get_family(teacher_arch).logprob_atol
    for row, replay in zip(rows, _teacher_replay(cfg, rows, synth_data), strict=True):
        np.testing.assert_allclose(row["lp_pos"], replay, atol=teacher_atol, rtol=0)
    student_atol = get_family(arch).logprob_atol
    pushed = _student_replay(out / "checkpoints" / "step_000001" / "model", cfg, rows, synth_data)
    for row, replay in zip(rows, pushed, strict=True):
        np.testing.assert_allclose(row["lp_old"], replay, atol=max(student_atol, 2e-4), rtol=0)
