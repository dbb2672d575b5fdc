"""The ceilings the project's actors are compared to: plain vLLM and plain transformers, in their own Ray actors.

`RawVLLM` is vLLM as a user would drive it by hand: requests built before the clock starts, one `LLM.generate` call
timed, nothing converted afterwards. It uses the engine settings of `vzero.engines.vllm` (same `LLM(...)` arguments),
so a ratio against it measures what the actors add around the engine, not a different engine configuration.
`BenchSampler` / `BenchGating` are the project's actors unchanged, plus a probe for their process CPU time (wall
clock on a shared 2-core machine moves with other people's load; CPU seconds much less).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from actors.sampler import Sampler
from gating.teacher import Gating


class _CpuProbe:
    def cpu_seconds(self) -> float:
        """CPU seconds this actor process used so far (all its threads)."""
        return time.process_time()


class BenchSampler(Sampler, _CpuProbe):
    pass


class BenchGating(Gating, _CpuProbe):
    pass


class RawVLLM(_CpuProbe):
    """Plain vLLM in an actor with a role's resources and engine options."""

    def __init__(self, model: str, options_json: str, device: str, min_pixels: int, max_pixels: int):
        from vzero.config import VLLMOptions
        from vzero.engines.vllm import VLLMEngine

        self.engine = VLLMEngine(
            model,
            device=device,
            options=VLLMOptions.model_validate_json(options_json),
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            worker_extension="actors.weight_receiver.WeightReceiverExtension",
        )
        self.llm = self.engine.llm
        self.model = model

    def generate(self, prompts: list, spec_json: str) -> dict:
        """One timed `LLM.generate` of the requests the Sampler actor would send for `prompts`: the same sampling
        parameters as `VLLMEngine.generate` (request i seeded spec.seed + i * n, banned ids masked), so both sides
        sample the same tokens and the ratio measures only what the actor adds around the engine."""
        from vllm import SamplingParams

        from vzero.engines import SamplingSpec
        from vzero.images import decode_rgb
        from vzero.vlm_inputs import chat_prompt_ids

        spec = SamplingSpec(**json.loads(spec_json))
        tok = self.engine.tokenizer
        reqs = [
            {"prompt_token_ids": chat_prompt_ids(tok, p.question), "multi_modal_data": {"image": decode_rgb(p.image)}}
            for p in prompts
        ]
        params = [
            SamplingParams(
                n=spec.n,
                temperature=spec.temperature,
                top_p=spec.top_p,
                max_tokens=spec.max_tokens,
                logprobs=0,
                seed=spec.seed + i * spec.n,
                detokenize=False,
                **self.engine.ban,
            )
            for i in range(len(reqs))
        ]
        c0, t0 = time.process_time(), time.perf_counter()
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "tokens_per_s": tokens / seconds}

    def prompt_logprobs(self, requests: list) -> dict:
        """One timed teacher-forced pass (`prompt_logprobs=0`) over prompt + response of every request."""
        from vllm import SamplingParams

        reqs = [
            {"prompt_token_ids": r["prompt_ids"] + r["response_ids"], "multi_modal_data": {"image": r["image"]}}
            for r in requests
        ]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        c0, t0 = time.process_time(), time.perf_counter()
        self.llm.generate(reqs, params, use_tqdm=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = sum(len(r["response_ids"]) for r in requests)
        return {"scored_tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "tokens_per_s": tokens / seconds}

    def load_floor(self) -> dict:
        """In-process load_weights of tensors already on the engine's device: the floor any push compares to."""
        import torch
        from safetensors.torch import load_file

        device = "cuda" if torch.cuda.is_available() else "cpu"
        weights = [
            (n, t)
            for f in sorted(Path(self.model).glob("*.safetensors"))
            for n, t in load_file(str(f), device=device).items()
        ]
        self.engine.load_weights(weights)  # warm-up
        t0 = time.perf_counter()
        self.engine.load_weights(weights)
        seconds = time.perf_counter() - t0
        nbytes = sum(t.numel() * t.element_size() for _, t in weights)
        return {"seconds": seconds, "gb": nbytes / 1e9, "gb_per_s": nbytes / 1e9 / seconds}


class HFGenerate:
    """transformers `generate` with the sampler's pixel budget: the fallback engine's speed, for reference."""

    def __init__(self, model: str, device: str, min_pixels: int, max_pixels: int):
        from vzero.engines.hf import HFEngine

        self.engine = HFEngine(model, device=device, min_pixels=min_pixels, max_pixels=max_pixels, batch_size=64)

    def generate(self, prompts: list, sequences: int, max_tokens: int) -> dict:
        from vzero.engines import GenerateRequest, SamplingSpec
        from vzero.images import decode_rgb
        from vzero.vlm_inputs import chat_prompt_ids

        reqs = [
            GenerateRequest(chat_prompt_ids(self.engine.tokenizer, p.question), decode_rgb(p.image))
            for p in prompts[:sequences]
        ]
        t0 = time.perf_counter()
        groups = self.engine.generate(reqs, SamplingSpec(1, 1.0, 1.0, max_tokens, 0))
        seconds = time.perf_counter() - t0
        tokens = sum(len(s.response_ids) for g in groups for s in g)
        return {"sequences": len(reqs), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
