"""The GPU benchmark: one command, one JSON file (`make bench`).

    python -m bench.gpu --out bench/results/gpu-h100.json                 # on one GPU: 3b preset, full sizes
    python -m bench.gpu --smoke --out /tmp/bench-smoke.json               # CPU, tiny preset: checks the code paths

Builds the `3b` preset (Qwen2.5-VL-3B shapes, random init) on the GPU, then measures in the same run, on the same
prompts (32 prompts x n=8 x 256 tokens, 448x448 images by default):
  rollout   raw vLLM generate tok/s | the project's Sampler actor tok/s | transformers generate tok/s
  teacher   Gating actor replay tok/s (positive + negative views) | raw vLLM prompt_logprobs on the same requests
  learner   one train step: response tokens/s, sequence tokens/s, MFU
  push      weight push learner -> sampler (CUDA IPC on one GPU) seconds and GB/s | in-process load_weights floor
  step      full V-Zero steps (driver, sync and async): seconds per stage and per step
Targets (issue): sampler >= 0.9x raw vLLM; push <= 0.5 s for 3b; teacher tok/s >= rollout tok/s; MFU >= 40%;
async step <= 1.15x the slowest stage. Each stage runs in its own Ray actors, which are killed before the next
stage, so stages do not compete for GPU memory; the full-step stage colocates sampler, teacher and learner on the
one GPU (it needs the H200's memory for the 3b preset; `--stages` picks stages, e.g. to split across calls).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STAGES = ("rollout", "teacher", "learner", "push", "step")


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="V-Zero GPU benchmark")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="qwen2_5_vl")
    ap.add_argument("--preset", default="3b")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--hf-sequences", type=int, default=16, help="sequences for the transformers generate baseline")
    ap.add_argument("--steps", type=int, default=3, help="full V-Zero steps per mode (the first is warm-up)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, tiny sizes: exercises every code path")
    a = ap.parse_args(argv)
    if a.smoke:
        a.preset, a.arch, a.prompts, a.n, a.max_tokens, a.image_size, a.hf_sequences, a.steps = (
            "tiny",
            "qwen2_vl",
            4,
            2,
            8,
            112,
            4,
            2,
        )
    return a


def _config(a: argparse.Namespace, model: Path, data: Path, out: Path, cuda: bool, **over: Any):
    """One config for every stage; on one GPU the three roles share it by fractions."""
    from vzero.config import load_config

    gpu = {"sampler": 0.4, "teacher": 0.3, "learner": 0.3} if cuda else {"sampler": 0, "teacher": 0, "learner": 0}
    mem = 0.2 if a.preset == "3b" else 0.1
    items = {
        "output_dir": out,
        "steps": a.steps,
        "data.path": data,
        "data.synth": None,
        "student.path": model,
        "student.build": None,
        "student.max_pixels": a.image_size**2,
        "student.min_pixels": 56 * 56,
        "rollout.num_samplers": 1,
        "rollout.prompts_per_step": a.prompts,
        "rollout.n": a.n,
        "rollout.max_tokens": a.max_tokens,
        "rollout.resources.num_gpus": gpu["sampler"],
        "rollout.vllm.gpu_memory_utilization": mem,
        "rollout.vllm.max_model_len": 4096,
        "rollout.vllm.enforce_eager": not cuda,
        "teacher.resources.num_gpus": gpu["teacher"],
        "teacher.vllm.gpu_memory_utilization": mem,
        "teacher.vllm.max_model_len": 4096,
        "teacher.micro_batch_size": 16,
        "learner.resources.num_gpus": gpu["learner"],
        "learner.param_dtype": "bfloat16" if cuda else "float32",
        "learner.micro_batch_size": 8,
        "learner.gradient_checkpointing": cuda,
        "learner.lr": 1e-6,
        "checkpoint.every": 0,
        "logging.progress_bar": False,
        "logging.tensorboard": False,
        "logging.ray_metrics": False,
        "ray.num_cpus": 8 if cuda else 4,
    }
    items.update(over)
    return load_config(
        None, [f"{k}={json.dumps(v) if not isinstance(v, (str, Path)) else v}" for k, v in items.items()]
    )


class RawVLLM:
    """Plain vLLM in an actor with the sampler's resources: the ceiling the project's actors are compared to."""

    def __init__(self, model: str, cfg_json: str):
        from vzero.config import TrainConfig
        from vzero.engines.vllm import VLLMEngine

        cfg = TrainConfig.model_validate_json(cfg_json)
        device = "cuda" if cfg.rollout.resources.num_gpus > 0 else "cpu"
        self.engine = VLLMEngine(
            model,
            device=device,
            options=cfg.rollout.vllm,
            min_pixels=cfg.student.min_pixels,
            max_pixels=cfg.student.max_pixels,
            worker_extension="actors.weight_receiver.WeightReceiverExtension",
        )
        self.llm = self.engine.llm
        self.model = model

    def generate(self, prompts: list, n: int, max_tokens: int) -> dict:
        from vllm import SamplingParams

        from vzero.images import decode_rgb
        from vzero.vlm_inputs import chat_prompt_ids

        tok = self.engine.tokenizer
        reqs = [
            {"prompt_token_ids": chat_prompt_ids(tok, p.question), "multi_modal_data": {"image": decode_rgb(p.image)}}
            for p in prompts
        ]
        params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, logprobs=0, seed=0, detokenize=False)
        self.llm.generate(reqs[:2], params, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}

    def prompt_logprobs(self, requests: list) -> dict:
        from vllm import SamplingParams

        reqs = [
            {"prompt_token_ids": r["prompt_ids"] + r["response_ids"], "multi_modal_data": {"image": r["image"]}}
            for r in requests
        ]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        self.llm.generate(reqs[:2], params, use_tqdm=False)
        t0 = time.perf_counter()
        self.llm.generate(reqs, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = sum(len(r["response_ids"]) for r in requests)
        return {"scored_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}

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
    def __init__(self, model: str, cfg_json: str):
        from vzero.config import TrainConfig
        from vzero.engines.hf import HFEngine

        cfg = TrainConfig.model_validate_json(cfg_json)
        device = "cuda" if cfg.rollout.resources.num_gpus > 0 else "cpu"
        self.engine = HFEngine(
            model, device=device, min_pixels=cfg.student.min_pixels, max_pixels=cfg.student.max_pixels, batch_size=64
        )

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


def run(a: argparse.Namespace) -> dict:
    import ray
    import torch

    from actors.sampler import Sampler
    from gating.teacher import Gating
    from learner.learner import Learner
    from vzero.cluster import spawn
    from vzero.data.stream import PromptStream
    from vzero.data.synth import write_synth
    from vzero.metrics_log import read_metrics
    from vzero.models.tiny import build_model

    cuda = torch.cuda.is_available() and not a.smoke
    work = Path(tempfile.mkdtemp(prefix="vzero-bench-"))
    res: dict[str, Any] = {"stages": {}}
    t0 = time.perf_counter()
    model = build_model(work / "model", arch=a.arch, preset=a.preset, seed=0, device="cuda" if cuda else "cpu")
    res["build_model_seconds"] = time.perf_counter() - t0
    data = work / "data.parquet"
    write_synth(data, n=a.prompts, seed=0, image_size=a.image_size)
    prompts = PromptStream(data, seed=0, shuffle=False).next_batch(a.prompts)
    cfg = _config(a, model, data, work / "run", cuda)
    cfg_json = cfg.model_dump_json()
    ray.init(
        address="local",
        num_cpus=cfg.ray.num_cpus,
        num_gpus=1 if cuda else 0,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parents[1])}},
    )
    S = res["stages"]

    def actor(cls, role_resources, *args):
        return spawn(cls, role_resources, f"bench-{cls.__name__}-{time.monotonic_ns()}", *args)

    trajectories = gated = None
    if {"rollout", "teacher", "learner", "push"} & set(a.stages):
        raw = actor(RawVLLM, cfg.rollout.resources, str(model), cfg_json)
        S["rollout"] = {"raw_vllm": ray.get(raw.generate.remote(prompts, a.n, a.max_tokens))}
        S["push"] = {"load_weights_floor": ray.get(raw.load_floor.remote())}
        ray.kill(raw)
        sampler = actor(Sampler, cfg.rollout.resources, cfg, 0)
        ray.get(sampler.generate.remote(prompts[:2], seed=1))  # warm-up
        t = time.perf_counter()
        trajectories, st = ray.get(sampler.generate.remote(prompts, seed=0))
        sec = time.perf_counter() - t
        S["rollout"]["sampler_actor"] = {
            "tokens": st["tokens"],
            "seconds": sec,
            "tokens_per_s": st["tokens"] / sec,
            "engine": st["engine"],
        }
        S["rollout"]["sampler_vs_raw"] = (
            S["rollout"]["sampler_actor"]["tokens_per_s"] / S["rollout"]["raw_vllm"]["tokens_per_s"]
        )
        hf = actor(HFGenerate, cfg.rollout.resources, str(model), cfg_json)
        S["rollout"]["transformers_generate"] = ray.get(hf.generate.remote(prompts, a.hf_sequences, a.max_tokens))
        ray.kill(hf)
        if "push" in a.stages or "learner" in a.stages:
            learner = actor(Learner, cfg.learner.resources, cfg)
            transport = "cuda_ipc" if cuda else "object_store"
            gater = actor(Gating, cfg.teacher.resources, cfg, 0)
            by_uid = {p.uid: p for p in prompts}
            ray.get(gater.gate.remote(trajectories[: a.n], by_uid))  # warm-up
            t = time.perf_counter()
            gated, gst = ray.get(gater.gate.remote(trajectories, by_uid))
            sec = time.perf_counter() - t
            S["teacher"] = {
                "gating_actor": {
                    "scored_tokens": gst["teacher/tokens"] * 2,
                    "seconds": sec,
                    "tokens_per_s": gst["teacher/tokens"] * 2 / sec,
                    "score_seconds": gst["teacher/score_seconds"],
                }
            }
            ray.kill(gater)
            if "learner" in a.stages:
                ray.get(learner.train_step.remote(gated, by_uid))  # warm-up (allocator, kernels)
                m = ray.get(learner.train_step.remote(gated, by_uid))
                S["learner"] = {
                    k: m[k]
                    for k in ("learner/seconds", "learner/tokens_per_s", "learner/seq_tokens_per_s", "learner/mfu")
                }
            if "push" in a.stages:
                times = []
                for version in (10, 11, 12):
                    t = time.perf_counter()
                    push = learner.state_for_push.remote(transport)
                    r = ray.get(sampler.update_weights.remote(push, version))
                    times.append(time.perf_counter() - t)
                    ray.get(learner.release_push.remote())
                gb = r["bytes"] / 1e9
                S["push"].update(
                    {
                        "transport": transport,
                        "seconds": min(times),
                        "all_seconds": times,
                        "gb": gb,
                        "gb_per_s": gb / min(times),
                        "sampler_load_seconds": r["seconds"],
                    }
                )
            ray.kill(learner)
        ray.kill(sampler)
    if "teacher" in a.stages and gated is not None:
        from vzero.models.loading import load_processor
        from vzero.views import views_for
        from vzero.vlm_inputs import chat_prompt_ids

        tok = load_processor(model).tokenizer
        views = {
            p.uid: views_for(
                p, mode=cfg.views.negative_mode, margin=cfg.views.margin, max_pixels=cfg.student.max_pixels, seed=0
            )
            for p in prompts
        }
        reqs = [
            {
                "prompt_ids": chat_prompt_ids(tok, by_uid[t.uid].question),
                "response_ids": t.response_ids,
                "image": views[t.uid][k],
            }
            for k in (0, 1)
            for t in gated
        ]
        raw = actor(RawVLLM, cfg.teacher.resources, str(model), cfg_json)
        S["teacher"]["raw_vllm_prompt_logprobs"] = ray.get(raw.prompt_logprobs.remote(reqs))
        ray.kill(raw)
        S["teacher"]["teacher_vs_rollout"] = (
            S["teacher"]["gating_actor"]["tokens_per_s"] / S["rollout"]["sampler_actor"]["tokens_per_s"]
        )
    if "step" in a.stages:
        from vzero.driver import train

        S["step"] = {}
        for mode in ("sync", "async"):
            c = _config(a, model, data, work / f"run-{mode}", cuda, mode=mode, max_staleness=1)
            train(c)
            ms = read_metrics(Path(c.output_dir) / "metrics.jsonl")[1:]  # drop the warm-up step
            stages = {
                k: sum(m[k] for m in ms) / len(ms)
                for k in (
                    "rollout/seconds",
                    "teacher/seconds",
                    "learner/seconds",
                    "weight_push/seconds",
                    "step/seconds",
                )
            }
            stages["slowest_stage_seconds"] = max(
                stages["rollout/seconds"], stages["teacher/seconds"], stages["learner/seconds"]
            )
            stages["step_over_slowest"] = stages["step/seconds"] / stages["slowest_stage_seconds"]
            S["step"][mode] = stages
    ray.shutdown()
    return res


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    import torch

    t0 = time.perf_counter()
    res = run(a)
    res.update(
        {
            "command": "python -m bench.gpu " + " ".join(sys.argv[1:] if argv is None else argv),
            "wall_seconds": time.perf_counter() - t0,
            "sizes": {
                "preset": a.preset,
                "arch": a.arch,
                "prompts": a.prompts,
                "n": a.n,
                "max_tokens": a.max_tokens,
                "image_size": a.image_size,
            },
            "device": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() and not a.smoke
            else platform.processor(),
            "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "ray", "vllm")},
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "targets": {
                "sampler_vs_raw": ">= 0.9",
                "push_seconds_3b": "<= 0.5",
                "teacher_vs_rollout": ">= 1",
                "learner_mfu": ">= 0.40",
                "async_step_over_slowest": "<= 1.15",
            },
            "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "CUDA_VISIBLE"))},
        }
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2, default=float) + "\n")
    print(json.dumps(res, default=float))
    return 0


# -- Shared-prefix rows (issue 16): bench/shared_prefix.py on this device, its JSON under stages.shared_prefix --
# Teacher scored tokens/s (raw vLLM prompt_logprobs vs vLLM / transformers shared-prefix scoring) and learner step
# seconds (shared vs unshared forward/backward) at >= 256 image tokens, n = 8, responses <= 128 tokens, plus the
# image-token and n sweeps. A subprocess: its engines and models leave the GPU when it exits.
STAGES = (*STAGES, "shared_prefix")
_run_stages = run


def run(a: argparse.Namespace) -> dict:
    res = _run_stages(a)
    if "shared_prefix" in a.stages:
        res["stages"]["shared_prefix"] = _shared_prefix_stage(a)
    return res


def _shared_prefix_stage(a: argparse.Namespace) -> dict:
    import subprocess

    import torch

    out = Path(tempfile.mkdtemp(prefix="vzero-bench-shared-prefix-")) / "shared-prefix.json"
    args = ["--out", str(out), "--arch", a.arch, "--preset", a.preset, "--n", str(a.n)]
    if torch.cuda.is_available() and not a.smoke:
        args += ["--device", "cuda", "--prompts", "8", "--max-tokens", "128", "--image-tokens", "256"]
        args += ["--sweep-image-tokens", "64", "256", "1024", "--sweep-n", "2", "4", "8", "--sweep-prompts", "4"]
    else:  # the code path only (the vLLM rows are exercised by tests/bench/test_shared_prefix_bench.py)
        args += ["--prompts", "1", "--max-tokens", "8", "--image-tokens", "16", "--reps", "1", "--no-vllm"]
        args += ["--sweep-image-tokens", "16", "--sweep-n", "2", "--sweep-prompts", "1"]
    subprocess.run([sys.executable, "-m", "bench.shared_prefix", *args], check=True, cwd=Path(__file__).parents[1])
    return json.loads(out.read_text())


if __name__ == "__main__":
    sys.exit(main())
