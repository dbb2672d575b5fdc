"""The transformers engine: batched `generate` and teacher-forced scoring with a Hugging Face model.

The fallback wherever vLLM is not importable (and the reference the vLLM engine is tested against). Sampled-token
log-probs come from the raw logits `generate` returns (`output_logits=True`), i.e. before temperature / top-p, as
vLLM's default `raw_logprobs` does; with `processed_logprobs` from the processed scores (`output_scores=True`: after
temperature and the suppressed ids), as vLLM's `processed_logprobs` does. Vision placeholder tokens are suppressed
while sampling: a sampled `<|image_pad|>` would make the response unreplayable (the model would look for an image
that is not there). Scoring is per request (one row per request: the reference) or `shared_prefix`: requests with
the same prompt and images are scored against one prefix forward (`vzero.shared_prefix`), with the model's preferred
exact route.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

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
from vzero.logprobs import response_logprobs
from vzero.models.families import family_of
from vzero.models.loading import load_model, load_processor
from vzero.shared_prefix import (
    Route,
    collate_shared,
    group_chunks,
    group_index,
    shared_prefix_logprobs,
    shared_prefix_routes,
)
from vzero.vlm_inputs import IMAGE_PAD, EncodedImage, ImageEncoder, collate


class HFEngine(Engine):
    name = "transformers"

    def __init__(
        self,
        path: str,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        min_pixels: int,
        max_pixels: int,
        batch_size: int = 16,
        trust_remote_code: bool = False,
        processed_logprobs: bool = False,
        scoring: str = "per_request",
        route: Route | None = None,
    ):
        self.device = torch.device(device)
        self.processed_logprobs = processed_logprobs
        self.processor = load_processor(path, trust_remote_code=trust_remote_code)
        self.model = load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code).eval()
        self.tokenizer = self.processor.tokenizer
        self.encoder = ImageEncoder(self.processor.image_processor, min_pixels=min_pixels, max_pixels=max_pixels)
        self.batch_size = batch_size
        # shared_prefix: the given route, else the model's preferred exact one; `auto` falls back to per request
        # for a model with none, an explicit `shared_prefix` refuses it.
        routes = shared_prefix_routes(self.model)
        self.route = route or (routes[0] if routes else None)
        if scoring == "shared_prefix" and self.route not in routes:
            raise ValueError(f"shared-prefix scoring: {path} supports the routes {routes}, not {self.route!r}")
        self.shared_prefix = scoring in ("auto", "shared_prefix") and self.route in routes
        self.scoring = "shared_prefix" if self.shared_prefix else "per_request"
        self.family = family_of(path)
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        gen_eos = self.model.generation_config.eos_token_id
        eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids = sorted({int(e) for e in eos if e is not None} | {int(self.tokenizer.eos_token_id)})
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.suppress_ids = banned_token_ids(self.tokenizer, vocab)

    # -- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: list[GenerateRequest], spec: SamplingSpec) -> list[list[Sample]]:
        check_image_pads(requests, self.image_pad_id)
        out: list[list[Sample]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            out.extend(self._generate_chunk(chunk, spec, seed=spec.seed + start))
        return out

    def _generate_chunk(self, chunk: list[GenerateRequest], spec: SamplingSpec, seed: int) -> list[list[Sample]]:
        rows = [(r.prompt_ids, [self.encoder(im) for im in r.images], []) for r in chunk]
        batch = collate(rows, pad_id=self.pad_id, image_pad_id=self.image_pad_id).to(self.device)
        inputs = batch.model_inputs()
        torch.manual_seed(seed)
        greedy = spec.temperature == 0  # evaluation: greedy decoding, as vLLM does for temperature 0
        if greedy and spec.n != 1:
            raise ValueError("greedy decoding (temperature 0) needs n == 1")
        sampling = {} if greedy else {"temperature": spec.temperature, "top_p": spec.top_p, "top_k": 0}
        gen = self.model.generate(
            **inputs,
            do_sample=not greedy,
            **sampling,
            max_new_tokens=spec.max_tokens,
            num_return_sequences=spec.n,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            suppress_tokens=self.suppress_ids,
            output_logits=not self.processed_logprobs,
            output_scores=self.processed_logprobs,
            return_dict_in_generate=True,
        )
        new_tokens = gen.sequences[:, inputs["input_ids"].shape[1] :]  # [B*n, S]
        steps = gen.scores if self.processed_logprobs else gen.logits
        logits = torch.stack(steps, dim=1).float()  # [B*n, S, V] raw logits (or processed scores)
        token_lp = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        samples: list[list[Sample]] = []
        eos = set(self.eos_ids)
        for i in range(len(chunk)):
            group = []
            for j in range(spec.n):
                row = i * spec.n + j
                ids = new_tokens[row].tolist()
                stop_at = next((k for k, t in enumerate(ids) if t in eos), None)
                T = len(ids) if stop_at is None else stop_at + 1
                group.append(
                    Sample(
                        response_ids=ids[:T],
                        logprobs=token_lp[row, :T].tolist(),
                        finish_reason="length" if stop_at is None else "stop",
                    )
                )
            samples.append(group)
        return samples

    # -- scoring ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        check_image_pads(requests, self.image_pad_id)
        encoded: dict[int, EncodedImage] = {}  # the n trajectories of a prompt share image objects: encode once
        rows = []
        for r in requests:
            for im in r.images:
                if id(im) not in encoded:
                    encoded[id(im)] = self.encoder(im)
            rows.append((r.prompt_ids, [encoded[id(im)] for im in r.images], r.response_ids))
        if self.shared_prefix:  # whole groups per forward, so each prefix is computed once
            chunks = group_chunks(group_index(rows), self.batch_size)
        else:
            chunks = [list(range(s, min(s + self.batch_size, len(rows)))) for s in range(0, len(rows), self.batch_size)]
        results: list[ScoreResult] = [ScoreResult([])] * len(requests)
        for chunk in chunks:
            sub = [rows[i] for i in chunk]
            topk = max(requests[i].topk for i in chunk)
            if self.shared_prefix:
                batch = collate_shared(sub, pad_id=self.pad_id, image_pad_id=self.image_pad_id).to(self.device)
                res = shared_prefix_logprobs(self.model, batch, route=self.route, topk=topk)
            else:
                batch = collate(sub, pad_id=self.pad_id, image_pad_id=self.image_pad_id).to(self.device)
                res = response_logprobs(self.model, batch, topk=topk)
            for j, i in enumerate(chunk):
                T, k = len(requests[i].response_ids), requests[i].topk
                results[i] = ScoreResult(
                    logprobs=res.logprobs[j, :T].float().tolist(),
                    topk_ids=res.topk_ids[j, :T, :k].tolist() if k else None,
                    topk_logprobs=res.topk_logprobs[j, :T, :k].float().tolist() if k else None,
                )
        return results

    # -- weights ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        n = 0
        for name, tensor in weights:
            if name.startswith(self.family.unserved_prefixes):  # e.g. Qwen3.5's mtp.*: not part of the served model
                continue
            if name not in params:
                raise KeyError(f"weight {name!r} does not exist in the sampler's model (different architecture?)")
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
            n += 1
        return n

    def join_weight_group(self, spec, rank_offset: int) -> None:
        from vzero.weight_group import WeightGroup

        if getattr(self, "_group", None) is not None:
            self._group.close()
        self._group = None
        self._group = WeightGroup(spec, rank_offset, self.device)

    def receive_weights(self, plan, version: int, *, load: bool = True) -> int:
        from vzero.weight_group import receive_buckets

        if getattr(self, "_group", None) is None:
            raise RuntimeError("this transformers engine is in no weight group: the driver must rebuild it")
        weights = receive_buckets(self._group, plan, version)
        return self.load_weights(weights) if load else sum(1 for _ in weights)
