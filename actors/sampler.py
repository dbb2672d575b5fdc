"""SamplerActor: samples n student trajectories per prompt on the FULL image, with sampled-token log-probs.

A plain class; the driver makes it a Ray actor with resources from the config (`ray.remote(**opts)(Sampler)`), so
tests can build it in-process too. It owns one engine (vLLM where installed, transformers otherwise) and a policy
version: every trajectory it returns is stamped with the version of the weights that produced it, and because a
Ray actor runs one method at a time, a weight update queued behind a `generate` never lands inside that batch.
After a restart (Ray `max_restarts`) it starts again at version 0 with the initial weights; the driver sees the
stale version and pushes the current weights before giving it work.
"""

from __future__ import annotations

import time

import torch

from actors.weight_receiver import receive
from vzero.config import TrainConfig
from vzero.engines import GenerateRequest, SamplingSpec, create_engine
from vzero.images import decode_rgb
from vzero.records import Prompt, Trajectory
from vzero.runtime import actor_device, setup_threads
from vzero.vlm_inputs import chat_prompt_ids
from vzero.weight_group import GroupSpec
from vzero.weights import WeightPush


class Sampler:
    def __init__(self, cfg: TrainConfig, rank: int = 0):
        self.cfg = cfg
        self.rank = rank
        setup_threads(cfg.rollout.resources)
        self.device = actor_device(cfg.rollout.resources)
        self.engine = create_engine(
            cfg.rollout.engine,
            cfg.student,
            device=self.device,
            vllm=cfg.rollout.vllm,
            seed=cfg.seed + rank,
            batch_size=cfg.rollout.hf_batch_size,
            worker_extension="actors.collective_receiver.CollectiveReceiverExtension",
            # Away from temperature 1, lp_old must be the log-prob of the distribution actually sampled (PPO ratio).
            processed_logprobs=cfg.rollout.temperature != 1.0,
        )
        self.tokenizer = self.engine.tokenizer
        self.version = 0
        self.group_id: str | None = None  # the collective transport's weight group, once joined

    def generate(self, prompts: list[Prompt], *, seed: int) -> tuple[list[Trajectory], dict[str, float]]:
        """n trajectories per prompt, grouped by prompt (group id = prompt uid), plus timing stats."""
        r = self.cfg.rollout
        t0 = time.perf_counter()
        requests = [
            GenerateRequest(chat_prompt_ids(self.tokenizer, p.question, self.cfg.student.chat), [decode_rgb(p.image)])
            for p in prompts
        ]
        spec = SamplingSpec(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=seed)
        groups = self.engine.generate(requests, spec)
        trajectories = [
            Trajectory(
                uid=p.uid,
                sample_index=j,
                policy_version=self.version,
                prompt_ids=req.prompt_ids,
                response_ids=s.response_ids,
                lp_old=s.logprobs,
                finish_reason=s.finish_reason,
            )
            for p, req, group in zip(prompts, requests, groups, strict=True)
            for j, s in enumerate(group)
        ]
        seconds = time.perf_counter() - t0
        tokens = sum(t.num_tokens for t in trajectories)
        return trajectories, {"seconds": seconds, "tokens": float(tokens), "engine": self.engine.name}

    def update_weights(self, push: WeightPush, version: int) -> dict[str, float]:
        """Load a pushed state (HF names) in place; a version we already have is skipped."""
        if version <= self.version:
            return {"skipped": 1.0, "seconds": 0.0, "version": float(self.version)}
        t0 = time.perf_counter()
        weights = list(receive(push, self.device))
        n = self.engine.load_weights(weights)
        self.version = version
        return {
            "skipped": 0.0,
            "seconds": time.perf_counter() - t0,
            "tensors": float(n),
            "bytes": float(push.nbytes),
            "version": float(version),
        }

    # -- the collective transport (vzero/pushes.py drives it; the learner sends) -----------------------------
    def weight_ranks(self) -> int:
        """Ranks this sampler contributes to its weight group (its engine's workers: tp for a TP engine)."""
        return self.engine.workers

    def join_weight_group(self, spec: GroupSpec) -> str:
        """Join a fresh weight group (rank 0 = the learner, this engine's workers at 1..tp); returns its id."""
        self.group_id = None
        self.engine.join_weight_group(spec, rank_offset=1)
        self.group_id = spec.group_id
        return spec.group_id

    def weight_group(self) -> str | None:
        """The id of the weight group this sampler is in (None after a restart: the driver rebuilds it)."""
        return self.group_id

    def receive_weights(self, push: WeightPush, version: int) -> dict[str, float]:
        """Take part in a collective push: load it, or drain it if this sampler already has `version`."""
        if self.group_id is None:
            raise RuntimeError(f"sampler-{self.rank} is in no weight group (restarted?); the driver must rebuild it")
        t0 = time.perf_counter()
        load = version > self.version
        n = self.engine.receive_weights(push.plan, version, load=load)
        if load:
            self.version = version
        return {
            "skipped": float(not load),
            "seconds": time.perf_counter() - t0,
            "tensors": float(n),
            "bytes": float(push.nbytes),
            "version": float(self.version),
        }

    def device_uuid(self) -> str:
        """This sampler's GPU (empty on CPU)."""
        return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid) if self.device == "cuda" else ""

    def policy_version(self) -> int:
        return self.version

    def ready(self) -> str:
        """Returns once __init__ finished (the driver waits on it); names the engine."""
        return f"sampler-{self.rank}: {self.engine.name} on {self.device}"
