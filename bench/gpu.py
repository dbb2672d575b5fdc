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
async step <= 1.15x the slowest stage. The stages live in `bench/stages.py` (shared with `bench.cpu`): an actor and
its raw-vLLM ceiling run interleaved on `--reps` fresh prompt batches, best rep each. Stage actors are killed once
their stage is done (at most 0.8 of the GPU is held at once); the full-step stage colocates sampler, teacher and
learner on the one GPU (it needs the H200's memory for the 3b preset; `--stages` picks stages, e.g. to split calls).
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

STAGES = ("rollout", "teacher", "learner", "push", "step", "shared_prefix")


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
    ap.add_argument("--reps", type=int, default=3, help="timed batches per compared pair (after one warm-up batch)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, tiny sizes: exercises every code path")
    a = ap.parse_args(argv)
    if a.smoke:
        a.preset, a.arch, a.prompts, a.n, a.max_tokens, a.image_size, a.hf_sequences, a.steps, a.reps = (
            "tiny",
            "qwen2_vl",
            4,
            2,
            8,
            112,
            4,
            2,
            1,
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


def run(a: argparse.Namespace) -> dict:
    import ray
    import torch

    from bench import stages
    from vzero.data.stream import PromptStream
    from vzero.data.synth import write_synth
    from vzero.models.tiny import build_model

    cuda = torch.cuda.is_available() and not a.smoke
    work = Path(tempfile.mkdtemp(prefix="vzero-bench-"))
    res: dict[str, Any] = {"stages": {}}
    t0 = time.perf_counter()
    model = build_model(work / "model", arch=a.arch, preset=a.preset, seed=0, device="cuda" if cuda else "cpu")
    res["build_model_seconds"] = time.perf_counter() - t0
    data = work / "data.parquet"
    write_synth(data, n=a.prompts * (a.reps + 1), seed=0, image_size=a.image_size)
    stream = PromptStream(data, seed=0, shuffle=False)
    batches = [stream.next_batch(a.prompts) for _ in range(a.reps + 1)]
    cfg = _config(a, model, data, work / "run", cuda)
    # Ray starts workers at nice 15 (RAY_worker_niceness): on a shared machine every other process would then starve
    # the measured actors. Jobs submitted to a cluster run at 0 (Ray's job manager sets it), as here.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        address="local",
        num_cpus=cfg.ray.num_cpus,
        num_gpus=1 if cuda else 0,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parents[1])}},
    )
    b = stages.Bench(cfg, model, batches, "cuda" if cuda else "cpu")
    S = res["stages"]
    if {"rollout", "teacher", "learner", "push"} & set(a.stages):
        S["rollout"], sampler, floor, trajectories = stages.rollout(b, hf_sequences=a.hf_sequences)
        S["teacher"], gated = stages.teacher(b, trajectories)
        S["teacher"]["teacher_vs_rollout"] = (
            S["teacher"]["gating_actor"]["tokens_per_s"] / S["rollout"]["sampler_actor"]["tokens_per_s"]
        )
        if {"learner", "push"} & set(a.stages):
            S["learner"], learner = stages.learner(b, gated)
            S["push"] = stages.push(b, learner, sampler, floor)
            ray.kill(learner)
        ray.kill(sampler)
    if "step" in a.stages:
        S["step"] = stages.steps(
            lambda mode: _config(a, model, data, work / f"run-{mode}", cuda, mode=mode, max_staleness=1)
        )
    ray.shutdown()
    if "shared_prefix" in a.stages:  # after the actors are gone: its own engines get the device
        S["shared_prefix"] = _shared_prefix_stage(a)
    return res


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    import torch

    t0 = time.perf_counter()
    res = run(a)
    if "push" in a.stages and not a.smoke:
        res["stages"]["collective_push"] = collective_push(a)
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
                "teacher_vs_raw": ">= 1",
                "learner_mfu": ">= 0.40",
                "async_step_over_slowest": "<= 1.15",
            },
            "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "CUDA_VISIBLE", "RAY_worker"))},
        }
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2, default=float) + "\n")
    print(json.dumps(res, default=float))
    return 0


def collective_push(a: argparse.Namespace) -> dict:
    """The collective transport (learner/collective.py): NCCL from the learner's GPU to a sampler on ANOTHER GPU.
    NCCL refuses two ranks on one GPU, so with one GPU this records why and measures what one GPU can: the
    learner's side of a push (gather + cast + pack into GPU buckets). With 2+ GPUs: 3 broadcasts of the whole
    model into the sampler (`wire_seconds`: the sampler already holds the version and drains it, so the load,
    measured by the push stage's floor, is not included)."""
    import ray
    import torch

    from actors.sampler import Sampler
    from learner.learner import Learner
    from vzero.cluster import spawn
    from vzero.data.synth import write_synth
    from vzero.models.tiny import build_model
    from vzero.pushes import WeightPusher

    gpus = torch.cuda.device_count()
    work = Path(tempfile.mkdtemp(prefix="vzero-bench-coll-"))
    model = build_model(work / "model", arch=a.arch, preset=a.preset, seed=0, device="cuda")
    write_synth(work / "data.parquet", n=4, seed=0, image_size=a.image_size)
    cfg = _config(a, model, work / "data.parquet", work / "run", True, **{"learner.weight_transport": "collective"})
    if gpus >= 2:  # whole GPUs: the learner on one, the sampler on another
        cfg.learner.resources.num_gpus = cfg.rollout.resources.num_gpus = 1.0
    ray.init(
        address="local",
        num_gpus=min(gpus, 2),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parents[1])}},
    )
    out: dict = {"gpus": gpus}
    try:
        learner = spawn(Learner, cfg.learner.resources, "bench-coll-learner", cfg)
        ray.get(learner.ready.remote())
        t = time.perf_counter()
        plan = ray.get(learner.state_for_push.remote("collective"))
        out["gather_pack_seconds"] = time.perf_counter() - t
        out["gb"] = plan.nbytes / 1e9
        if gpus < 2:
            out["skipped"] = "NCCL needs the sampler on another GPU (it refuses two ranks on one GPU); one GPU here"
            return out
        sampler = spawn(Sampler, cfg.rollout.resources, "bench-coll-sampler", cfg, 0)
        ray.get(sampler.ready.remote())
        pusher = WeightPusher(cfg, learner, [sampler])
        pusher.publish(0)
        times = []
        for _ in range(4):  # the first also builds the group (rendezvous + NCCL init)
            pusher.known.clear()
            t = time.perf_counter()
            pusher.push_all(0)
            times.append(time.perf_counter() - t)
        out.update({"first_with_rendezvous_seconds": times[0], "wire_seconds": min(times[1:]), "all": times})
        out["gb_per_s"] = out["gb"] / out["wire_seconds"]
        return out
    finally:
        ray.shutdown()


# -- Shared-prefix rows (issue 16): bench/shared_prefix.py on this device, its JSON under stages.shared_prefix --
# Teacher scored tokens/s (raw vLLM prompt_logprobs vs vLLM / transformers shared-prefix scoring) and learner step
# seconds (shared vs unshared forward/backward) at >= 256 image tokens, n = 8, responses <= 128 tokens, plus the
# image-token and n sweeps. A subprocess: its engines and models leave the GPU when it exits.
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
