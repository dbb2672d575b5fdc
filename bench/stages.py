"""The benchmark stages both entry points run: `bench.gpu` (one GPU) and `bench.cpu` (this 2-core machine).

Contract: a `Bench` holds the config, the model and `reps + 1` prompt batches (batch 0 warms up, batch r is rep r);
each stage function takes it and returns JSON-able dicts. A pair that is compared (an actor against its raw-vLLM
ceiling) runs interleaved, rep by rep and in alternating order, each engine seeing every batch exactly once: cold
prefix / encoder / image-processor caches, as in training, where every step brings new images and a weight push
resets the caches. The best rep of each side counts (on a shared machine the best rep is the one least disturbed by
other load); all reps are kept, with wall and process-CPU seconds.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from bench.baselines import BenchGating, BenchSampler, HFGenerate, RawVLLM
from vzero.cluster import spawn
from vzero.config import ActorResources, TrainConfig
from vzero.records import Prompt, Trajectory

STEP_KEYS = ("rollout/seconds", "teacher/seconds", "learner/seconds", "weight_push/seconds", "step/seconds")


@dataclass
class Bench:
    cfg: TrainConfig
    model: Path
    batches: list[list[Prompt]]  # batch 0 = warm-up
    device: str  # "cpu" | "cuda"

    def actor(self, cls: type, resources: ActorResources, *args: Any) -> Any:
        return spawn(cls, resources, f"bench-{cls.__name__}-{time.monotonic_ns()}", *args)


def _best(reps: list[dict], key: str = "tokens_per_s") -> dict:
    out = dict(max(reps, key=lambda r: r[key]))
    out["reps"] = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in reps]
    return out


def _timed(actor: Any, call: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run a remote call; return its result, the driver-side wall seconds and the actor's CPU seconds."""
    c0 = ray.get(actor.cpu_seconds.remote())
    t0 = time.perf_counter()
    out = ray.get(call())
    wall = time.perf_counter() - t0
    return out, wall, ray.get(actor.cpu_seconds.remote()) - c0


def _pair(b: Bench, first: Callable[[int], dict], second: Callable[[int], dict]) -> tuple[list[dict], list[dict]]:
    """Run both sides on every batch, alternating which goes first; drop the warm-up batch."""
    a, c = [], []
    for i in range(len(b.batches)):
        if i % 2:
            y = second(i)
            x = first(i)
        else:
            x = first(i)
            y = second(i)
        if i:
            a.append(x)
            c.append(y)
    return a, c


# -- rollout ----------------------------------------------------------------------------------------------------
def rollout(b: Bench, hf_sequences: int = 0) -> tuple[dict, Any, dict, list[list[Trajectory]]]:
    """Sampler actor vs raw vLLM generate on the same batches. Returns (results, the sampler actor, the load floor
    measured on the raw engine, the sampler's trajectories of every batch, warm-up included)."""
    cfg, r = b.cfg, b.cfg.rollout
    pix = (cfg.student.min_pixels, cfg.student.max_pixels)
    raw = b.actor(RawVLLM, r.resources, str(b.model), r.vllm.model_dump_json(), b.device, *pix)
    sampler = b.actor(BenchSampler, r.resources, cfg, 0)
    ray.get([raw.cpu_seconds.remote(), sampler.ready.remote()])
    trajectories: list[list[Trajectory]] = []

    def spec(i: int) -> str:  # what Sampler.generate(batch, seed=i) samples with
        return json.dumps(
            {"n": r.n, "temperature": r.temperature, "top_p": r.top_p, "max_tokens": r.max_tokens, "seed": i}
        )

    def run_raw(i: int) -> dict:
        return ray.get(raw.generate.remote(b.batches[i], spec(i)))

    def run_sampler(i: int) -> dict:
        (trajs, st), wall, cpu = _timed(sampler, lambda: sampler.generate.remote(b.batches[i], seed=i))
        trajectories.append(trajs)
        return {
            "tokens": st["tokens"],
            "seconds": wall,  # what the driver waits: request building, engine, trajectories, Ray transfer
            "actor_seconds": st["seconds"],
            "cpu_seconds": cpu,
            "tokens_per_s": st["tokens"] / wall,
            "tokens_per_cpu_s": st["tokens"] / cpu,
            "engine": st["engine"],
        }

    raws, samps = _pair(b, run_raw, run_sampler)
    for x in raws:
        x["tokens_per_cpu_s"] = x["tokens"] / x["cpu_seconds"]
    res = {"raw_vllm": _best(raws), "sampler_actor": _best(samps)}
    res["sampler_vs_raw"] = res["sampler_actor"]["tokens_per_s"] / res["raw_vllm"]["tokens_per_s"]
    res["sampler_vs_raw_cpu"] = max(x["tokens_per_cpu_s"] for x in samps) / max(x["tokens_per_cpu_s"] for x in raws)
    res["same_tokens"] = all(x["tokens"] == y["tokens"] for x, y in zip(raws, samps, strict=True))
    floor = ray.get(raw.load_floor.remote())
    ray.kill(raw)
    if hf_sequences:
        hf = b.actor(HFGenerate, r.resources, str(b.model), b.device, *pix)
        res["transformers_generate"] = ray.get(hf.generate.remote(b.batches[1], hf_sequences, r.max_tokens))
        ray.kill(hf)
    return res, sampler, floor, trajectories


# -- teacher ----------------------------------------------------------------------------------------------------
def _raw_score_requests(cfg: TrainConfig, prompts: list[Prompt], trajs: list[Trajectory]) -> list[dict]:
    """What the Gating actor replays, built by hand: both views of every trajectory, the teacher's own prompt ids
    and images (`teacher_inputs`: teacher.context, row templates, pixel budgets)."""
    from gating.teacher import teacher_inputs
    from vzero.models.loading import load_processor

    tm = cfg.teacher_model
    tok = load_processor(tm.path, trust_remote_code=tm.trust_remote_code).tokenizer
    inputs = {p.uid: teacher_inputs(p, cfg, tok) for p in prompts}
    return [
        {"prompt_ids": inputs[t.uid].prompt_ids, "response_ids": t.response_ids, "image": _mm(view)}
        for k in (0, 1)
        for t in trajs
        if t.uid in inputs
        for view in [(inputs[t.uid].pos, inputs[t.uid].neg)[k]]
    ]


def _mm(images: list) -> object:
    """vLLM's multi_modal_data image entry: one image, or the list in pad order."""
    return images[0] if len(images) == 1 else images


def teacher(b: Bench, trajectories: list[list[Trajectory]]) -> tuple[dict, list[list[Trajectory]]]:
    """Gating actor replay (both views + the gate) vs raw vLLM prompt_logprobs on the same requests."""
    cfg, tm = b.cfg, b.cfg.teacher_model
    raw = b.actor(
        RawVLLM,
        cfg.teacher.resources,
        tm.path,
        cfg.teacher.vllm.model_dump_json(),
        b.device,
        tm.min_pixels,
        tm.max_pixels,
    )
    gater = b.actor(BenchGating, cfg.teacher.resources, cfg, 0)
    ray.get([raw.cpu_seconds.remote(), gater.ready.remote()])
    requests = [_raw_score_requests(cfg, p, t) for p, t in zip(b.batches, trajectories, strict=True)]
    gated: list[list[Trajectory]] = []

    def run_raw(i: int) -> dict:
        x = ray.get(raw.prompt_logprobs.remote(requests[i]))
        x["tokens_per_cpu_s"] = x["scored_tokens"] / x["cpu_seconds"]
        return x

    def run_gating(i: int) -> dict:
        by_uid = {p.uid: p for p in b.batches[i]}
        (out, st), wall, cpu = _timed(gater, lambda: gater.gate.remote(trajectories[i], by_uid))
        if i:
            gated.append(out)
        scored = 2 * st["teacher/tokens"]  # positive and negative view
        return {
            "scored_tokens": scored,
            "seconds": wall,
            "actor_seconds": st["teacher/seconds"],
            "score_seconds": st["teacher/score_seconds"],
            "views_seconds": st["teacher/views_seconds"],
            "cpu_seconds": cpu,
            "tokens_per_s": scored / wall,
            "tokens_per_cpu_s": scored / cpu,
        }

    raws, gates = _pair(b, run_raw, run_gating)
    ray.kill(raw)
    ray.kill(gater)
    res = {"gating_actor": _best(gates), "raw_vllm_prompt_logprobs": _best(raws)}
    res["teacher_vs_raw"] = res["gating_actor"]["tokens_per_s"] / res["raw_vllm_prompt_logprobs"]["tokens_per_s"]
    res["teacher_vs_raw_cpu"] = max(x["tokens_per_cpu_s"] for x in gates) / max(x["tokens_per_cpu_s"] for x in raws)
    return res, gated


# -- learner and weight push ------------------------------------------------------------------------------------
def learner(b: Bench, gated: list[list[Trajectory]]) -> tuple[dict, Any]:
    """One optimiser step per rep (after a warm-up step): response and sequence tokens/s, MFU."""
    from learner.learner import Learner

    learner = b.actor(Learner, b.cfg.learner.resources, b.cfg)
    by_uid = {p.uid: p for batch in b.batches for p in batch}
    ray.get(learner.train_step.remote(gated[0], by_uid))  # warm-up (allocator, kernels)
    keys = ("learner/seconds", "learner/tokens_per_s", "learner/seq_tokens_per_s", "learner/mfu")
    reps = [{k: m[k] for k in keys} for m in ray.get([learner.train_step.remote(g, by_uid) for g in gated])]
    return _best(reps, "learner/tokens_per_s"), learner


def push(b: Bench, learner: Any, sampler: Any, floor: dict, versions: int = 3) -> dict:
    """Learner -> sampler weight push (CUDA IPC on one GPU, else the object store) vs the in-process load floor."""
    transport = "cuda_ipc" if b.device == "cuda" else "object_store"
    times = []
    for version in range(100, 100 + versions):
        t = time.perf_counter()
        ref = learner.state_for_push.remote(transport)
        r = ray.get(sampler.update_weights.remote(ref, version))
        times.append(time.perf_counter() - t)
        ray.get(learner.release_push.remote())
    gb = r["bytes"] / 1e9
    return {
        "load_weights_floor": floor,
        "transport": transport,
        "seconds": min(times),
        "all_seconds": times,
        "gb": gb,
        "gb_per_s": gb / min(times),
        "sampler_load_seconds": r["seconds"],
        "push_over_floor": min(times) / floor["seconds"],
    }


# -- full steps -------------------------------------------------------------------------------------------------
def steps(make_cfg: Callable[[str], TrainConfig]) -> dict:
    """Full V-Zero steps through the driver, sync then async; per-stage seconds are medians over the steps after
    the first (warm-up). `step_over_slowest` uses the same run's stages (each slowed by the others when they
    overlap); `async_over_slowest_alone` divides the async step by the slowest stage of the sync run, where every
    stage runs alone: the overlap a perfect schedule would reach."""
    from vzero.driver import train
    from vzero.metrics_log import read_metrics

    out: dict[str, Any] = {}
    for mode in ("sync", "async"):
        c = make_cfg(mode)
        train(c)
        ms = read_metrics(Path(c.output_dir) / "metrics.jsonl")
        later = ms[1:] or ms
        st = {k: statistics.median(m[k] for m in later) for k in STEP_KEYS}
        st["per_step"] = [{k: round(m[k], 4) for k in STEP_KEYS} for m in ms]
        st["slowest_stage_seconds"] = max(st["rollout/seconds"], st["teacher/seconds"], st["learner/seconds"])
        st["step_over_slowest"] = st["step/seconds"] / st["slowest_stage_seconds"]
        out[mode] = st
    out["async_over_slowest_alone"] = out["async"]["step/seconds"] / out["sync"]["slowest_stage_seconds"]
    out["async_over_sync"] = out["async"]["step/seconds"] / out["sync"]["step/seconds"]
    return out
