"""Shared-prefix teacher replay and learner step vs the unshared paths, on the same requests, in one run -> JSON.

    python -m bench.shared_prefix --out bench/results/shared-prefix-cpu.json           # CPU, small preset
    python -m bench.shared_prefix --device cuda --preset 3b --out /tmp/shared-prefix-gpu.json   # one GPU

Requests have the proportions of a V-Zero step: `--prompts` prompts, each with a positive and a negative teacher view
of `--image-tokens` image tokens (square noise images of side 28·√tokens), n responses each of uniform random
length in [max_tokens/4, max_tokens] (random ids from the tokenizer's ordinary tokens).

Teacher rows (scored response tokens/s, both views): raw vLLM `prompt_logprobs=0, max_tokens=1` (per request: vLLM
computes prompt log-probs without reading its prefix cache), the vLLM engine's shared-prefix scoring (prefixes once,
then prompt log-probs read the prefix cache), the transformers engine per request and its shared-prefix scoring
(vzero/shared_prefix.py, routes `cache` and `packed`). Learner rows: seconds per `Learner.train_step` (the project's
step: default loss, 2 mini-batches, old log-probs recomputed; micro-batch = one group of n rows), unshared vs shared
(both routes). Each variant runs `--reps` times interleaved with the others; the minimum is reported and all times
are kept. On CPU the ratios use
process CPU seconds (one torch thread; vLLM in-process also drops to one): the CI machine is shared with other jobs,
and wall time there measures the neighbours as much as the code (wall seconds are recorded next to them).
A sweep over image tokens and n shows how the ratios move (fewer reps).
Agreement is checked on the way: shared vs per-request log-probs, vLLM vs transformers, shared vs unshared loss (the
gradients' equality is a test: tests/vzero/test_shared_prefix.py, tests/learner/test_shared_prefix_learner.py).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="qwen2_5_vl")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--image-tokens", type=int, default=256, help="image tokens per view (a square number)")
    ap.add_argument("--teacher-batch", type=int, default=16, help="rows per teacher forward (teacher.micro_batch_size)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sweep-image-tokens", type=int, nargs="*", default=[64, 256, 1024])
    ap.add_argument("--sweep-n", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--sweep-prompts", type=int, default=2)
    ap.add_argument("--no-vllm", action="store_true", help="skip the raw vLLM row (e.g. where vLLM is missing)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave as is)")
    return ap.parse_args(argv)


def _side(image_tokens: int) -> int:
    root = math.isqrt(image_tokens)
    if root * root != image_tokens:
        raise SystemExit(f"--image-tokens must be a square number, got {image_tokens}")
    return 28 * root


def _ordinary_ids(tok: Any, vocab: int) -> list[int]:
    from vzero.engines.base import banned_token_ids

    banned = set(banned_token_ids(tok, vocab)) | set(tok.all_special_ids)
    return [i for i in range(len(tok)) if i not in banned]


def make_groups(tok: Any, vocab: int, *, prompts: int, n: int, max_tokens: int, image_tokens: int, seed: int = 0):
    """[(prompt_ids, [pos image, neg image], [n response id lists])] with fixed random content."""
    from PIL import Image

    from vzero.vlm_inputs import chat_prompt_ids

    rng = np.random.default_rng(seed)
    side = _side(image_tokens)
    ids = np.array(_ordinary_ids(tok, vocab))
    out = []
    for p in range(prompts):
        views = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(2)]
        question = f"Question {p}: what is written on the small sign in the lower left corner of the picture?"
        lengths = rng.integers(max(1, max_tokens // 4), max_tokens + 1, size=n)
        out.append((chat_prompt_ids(tok, question), views, [rng.choice(ids, size=int(t)).tolist() for t in lengths]))
    return out


def score_requests(groups) -> list:
    from vzero.engines import ScoreRequest

    return [ScoreRequest(ids, views[v], r) for v in (0, 1) for ids, views, resp in groups for r in resp]


class Clock:
    """Wall and process-CPU seconds of a block; `seconds` is what ratios use (CPU time on CPU, wall on GPU)."""

    cpu_time = True

    def __enter__(self) -> Clock:
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c
        self.seconds = self.cpu if Clock.cpu_time else self.wall


def _summary(clocks: list[Clock]) -> dict[str, Any]:
    return {
        "seconds": min(c.seconds for c in clocks),
        "all_seconds": [round(c.seconds, 4) for c in clocks],
        "all_wall_seconds": [round(c.wall, 4) for c in clocks],
    }


def teacher_rows(hf, vllm, groups, reps: int) -> dict[str, Any]:
    """Scored tokens/s of each teacher path on the same requests (both views), interleaved repetitions.

    `vllm` is a VLLMEngine (or None): its raw `prompt_logprobs` requests (what the authors' teacher does) and its
    shared-prefix scoring, each from an empty prefix cache. `hf` is the transformers engine, per request and shared."""
    reqs = score_requests(groups)
    tokens = sum(len(r.response_ids) for r in reqs)
    variants = {
        "transformers_per_request": ("per_request", None),
        "transformers_shared_prefix_cache": ("shared_prefix", "cache"),
        "transformers_shared_prefix_packed": ("shared_prefix", "packed"),
    }
    times: dict[str, list[Clock]] = {k: [] for k in variants}
    outputs: dict[str, list] = {}
    share = vllm is not None and vllm.scoring == "shared_prefix"  # CPU engines (GPU ones score per request)
    if vllm is not None:
        from vllm import SamplingParams

        prompts = [vllm._prompt(r, r.prompt_ids + r.response_ids) for r in reqs]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        vllm.llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        times["raw_vllm_prompt_logprobs"] = []
        if share:
            times["vllm_shared_prefix"], cached = [], []
    hf.score(reqs[:2])  # warm-up
    for _ in range(reps):
        if vllm is not None:
            vllm.reset_caches()
            with Clock() as c:
                outs = vllm.llm.generate(prompts, params, use_tqdm=False)
            times["raw_vllm_prompt_logprobs"].append(c)
            outputs["raw_vllm_prompt_logprobs"] = [
                [
                    float(e[tok].logprob)
                    for tok, e in zip(r.response_ids, o.prompt_logprobs[-len(r.response_ids) :], strict=True)
                ]
                for r, o in zip(reqs, outs, strict=True)
            ]
        if share:
            vllm.reset_caches()
            with Clock() as c:
                res = vllm.score(reqs)
            times["vllm_shared_prefix"].append(c)
            outputs["vllm_shared_prefix"] = [r.logprobs for r in res]
            cached.append(vllm.score_stats)
        for name, (scoring, route) in variants.items():
            hf.shared_prefix, hf.route = scoring == "shared_prefix", route or "cache"
            with Clock() as c:
                res = hf.score(reqs)
            times[name].append(c)
            outputs[name] = [r.logprobs for r in res]
    ref = outputs["transformers_per_request"]
    rows: dict[str, Any] = {"requests": len(reqs), "scored_tokens": tokens}
    for name, ts in times.items():
        diff = max(abs(a - b) for x, y in zip(outputs[name], ref, strict=True) for a, b in zip(x, y, strict=True))
        rows[name] = {**_summary(ts), "max_abs_diff_vs_transformers_per_request": diff}
        rows[name]["tokens_per_s"] = tokens / rows[name]["seconds"]
    rate = {k: v["tokens_per_s"] for k, v in rows.items() if isinstance(v, dict)}
    best_hf = max(rate["transformers_shared_prefix_cache"], rate["transformers_shared_prefix_packed"])
    rows["transformers_shared_over_per_request"] = best_hf / rate["transformers_per_request"]
    if share:
        rows["vllm_shared_prefix"]["score_stats"] = cached[-1]
        rows["vllm_shared_over_raw_vllm"] = rate["vllm_shared_prefix"] / rate["raw_vllm_prompt_logprobs"]
    if vllm is not None:
        rows["transformers_shared_over_raw_vllm"] = best_hf / rate["raw_vllm_prompt_logprobs"]
        best = max(best_hf, rate.get("vllm_shared_prefix", 0.0))
        rows["best_shared_over_raw_vllm"] = best / rate["raw_vllm_prompt_logprobs"]
    return rows


def make_learner(model_dir: Path, pix: dict[str, int], n: int, prompts: int, device: str, threads: int):
    """The project's Learner on the bench model (default loss, 2 mini-batches where there are 2 prompts, old log-probs
    recomputed; micro-batch = one group of n rows), lr ~0 so that every variant steps from the same weights."""
    from learner.learner import Learner
    from vzero.config import load_config

    over = {
        "student.path": str(model_dir),
        "student.build": "null",
        "student.min_pixels": pix["min_pixels"],
        "student.max_pixels": pix["max_pixels"],
        "rollout.n": n,
        "learner.lr": 1e-12,
        "learner.micro_batch_size": n,
        "learner.mini_batches_per_step": min(2, prompts),
        "learner.resources.num_cpus": max(1, threads),
    }
    if device == "cuda":  # bf16 master weights: what lets a 3b learner share a GPU (learner.param_dtype)
        over.update({"learner.resources.num_gpus": 1, "learner.param_dtype": "bfloat16"})
    return Learner(load_config(None, [f"{k}={v}" for k, v in over.items()]))


def learner_rows(learner, groups, reps: int) -> dict[str, Any]:
    """Seconds per `Learner.train_step` on the groups' trajectories (student view = the first image), unshared vs
    shared (both routes), interleaved repetitions; the loss of each variant's last step (same weights)."""
    import io

    from vzero.records import Prompt, Trajectory

    rng = np.random.default_rng(1)
    prompts, trajs = {}, []
    for g, (ids, views, resp) in enumerate(groups):
        buf = io.BytesIO()
        views[0].save(buf, format="PNG")
        uid = f"p{g}"
        prompts[uid] = Prompt(uid, buf.getvalue(), f"question {g}", (0.0, 0.0, 8.0, 8.0))
        for j, r in enumerate(resp):
            lp = (-rng.random(len(r)) * 3).tolist()
            trajs.append(Trajectory(uid, j, 0, ids, r, lp, "stop", lp_pos=lp[::-1], weight=1.0))
    variants = {"unshared": None, "shared_prefix_cache": "cache", "shared_prefix_packed": "packed"}
    learner.shared_route = "cache"
    learner.train_step(trajs, prompts)  # warm-up
    times: dict[str, list[Clock]] = {k: [] for k in variants}
    metrics: dict[str, dict[str, float]] = {}
    for _ in range(reps):
        for name, route in variants.items():
            learner.shared_route = route
            with Clock() as c:
                metrics[name] = learner.train_step(trajs, prompts)
            times[name].append(c)
    learner.shared_route = "cache"
    rows: dict[str, Any] = {"trajectories": len(trajs), "response_tokens": sum(t.num_tokens for t in trajs)}
    for name, ts in times.items():
        m = metrics[name]
        rows[name] = {
            **_summary(ts),
            "loss": m["loss"],
            "abs_loss_diff_vs_unshared": abs(m["loss"] - metrics["unshared"]["loss"]),
            "seq_tokens_per_step": m["learner/seq_tokens_per_s"] * m["learner/seconds"],
        }
    best = min(rows["shared_prefix_cache"]["seconds"], rows["shared_prefix_packed"]["seconds"])
    rows["unshared_over_shared"] = rows["unshared"]["seconds"] / best
    return rows


def run(a: argparse.Namespace) -> dict[str, Any]:
    import gc

    import torch

    from vzero.engines.hf import HFEngine
    from vzero.models.tiny import build_model

    if a.threads:
        torch.set_num_threads(a.threads)
    Clock.cpu_time = a.device == "cpu"
    work = Path(tempfile.mkdtemp(prefix="vzero-shared-prefix-"))
    model_dir = build_model(work / "model", arch=a.arch, preset=a.preset, seed=0, device=a.device)
    side = max(_side(a.image_tokens), *(_side(t) for t in a.sweep_image_tokens))
    pix = {"min_pixels": 56 * 56, "max_pixels": side**2}
    hf = HFEngine(str(model_dir), device=a.device, batch_size=a.teacher_batch, scoring="auto", **pix)
    vocab, tok = hf.model.get_output_embeddings().weight.shape[0], hf.tokenizer
    sizes = {"prompts": a.prompts, "n": a.n, "max_tokens": a.max_tokens, "image_tokens": a.image_tokens}
    sweeps = [
        ("image_tokens", t, {**sizes, "prompts": a.sweep_prompts, "image_tokens": t}) for t in a.sweep_image_tokens
    ]
    sweeps += [("n", n, {**sizes, "prompts": a.sweep_prompts, "n": n}) for n in a.sweep_n]
    groups = make_groups(tok, vocab, **sizes)
    res: dict[str, Any] = {}
    vllm = None
    if not a.no_vllm:
        from vzero.config import VLLMOptions
        from vzero.engines.vllm import VLLMEngine

        longest = len(groups[0][0]) + max(a.image_tokens, *a.sweep_image_tokens) + a.max_tokens + 64
        opts = VLLMOptions(max_model_len=256 * math.ceil(longest / 256), max_num_seqs=64, gpu_memory_utilization=0.3)
        t = time.perf_counter()
        vllm = VLLMEngine(str(model_dir), device=a.device, options=opts, scoring="auto", **pix)
        res["vllm_start_seconds"] = time.perf_counter() - t
    reps = max(1, a.reps - 1)
    res["teacher"] = teacher_rows(hf, vllm, groups, a.reps)
    sweep_groups = {(kind, v): make_groups(tok, vocab, **sz) for kind, v, sz in sweeps}
    teacher_sweep = {key: teacher_rows(hf, vllm, g, reps) for key, g in sweep_groups.items()}
    if vllm is not None:  # the learner's memory next (a GPU holds one of them comfortably, not both)
        vllm.close()
        del vllm
    del hf
    gc.collect()
    # The learner trains the same random-init model: fp32 master weights on CPU (the default), bf16 on GPU (what
    # lets a 3b learner fit next to nothing else: learner.param_dtype=bfloat16). One Learner per (n, prompts).
    learners: dict[tuple[int, int], Any] = {}

    def learner(sz: dict[str, int]):
        key = (sz["n"], sz["prompts"])
        if key not in learners:
            learners.clear()
            gc.collect()
            learners[key] = make_learner(model_dir, pix, sz["n"], sz["prompts"], a.device, a.threads)
        return learners[key]

    res["learner"] = learner_rows(learner(sizes), groups, a.reps)
    sweep: dict[str, Any] = {"image_tokens": {}, "n": {}}
    for kind, v, sz in sweeps:
        lr = learner_rows(learner(sz), sweep_groups[(kind, v)], reps)
        sweep[kind][str(v)] = _ratios(teacher_sweep[(kind, v)], lr)
    res["sweep"] = sweep
    return res


def _ratios(t: dict[str, Any], lr: dict[str, Any]) -> dict[str, float]:
    rates = {f"teacher_{k}_tokens_per_s": v["tokens_per_s"] for k, v in t.items() if isinstance(v, dict)}
    ratios = {f"teacher_{k}": v for k, v in t.items() if k.endswith(("_over_raw_vllm", "_over_per_request"))}
    return {
        **ratios,
        **rates,
        "learner_unshared_over_shared": lr["unshared_over_shared"],
        "learner_cache_seconds": lr["shared_prefix_cache"]["seconds"],
        "learner_packed_seconds": lr["shared_prefix_packed"]["seconds"],
        "learner_unshared_seconds": lr["unshared"]["seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    import torch

    t0 = time.perf_counter()
    res = run(a)
    res = {
        "what": "shared-prefix teacher replay and learner step vs unshared, same requests, one run",
        "command": "python -m bench.shared_prefix " + " ".join(sys.argv[1:] if argv is None else argv),
        "sizes": {k: getattr(a, k) for k in ("arch", "preset", "prompts", "n", "max_tokens", "image_tokens")},
        "goals": {"teacher vllm_shared_over_raw_vllm": ">= 2", "learner unshared_over_shared": ">= 2"},
        **res,
        "wall_seconds": time.perf_counter() - t0,
        "device": torch.cuda.get_device_name(0) if a.device == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "seconds_are": "process CPU seconds" if a.device == "cpu" else "wall seconds",
        "versions": {
            m: __import__(m).__version__ for m in ("torch", "transformers", *(() if a.no_vllm else ("vllm",)))
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("teacher", "learner")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
