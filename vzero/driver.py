"""The V-Zero recipe on Ray: setup -> step loop (sample -> gate -> learn -> push weights) -> cleanup.

`train(cfg)` is what `vzero train` runs. One step, in order:
  1. prompts   = stream.next_batch(rollout.prompts_per_step)            (Parquet rows, `answer` never read)
  2. samples   = samplers.generate(prompts)      n trajectories/prompt on the full image, with sampler log-probs
  3. gated     = gating.gate(samples)             teacher replay on positive + negative views -> gate weights
  4. metrics   = learner.train_step(gated)        gated distillation loss, AdamW step, policy version + 1
  5. push      learner weights -> every sampler   (one object-store put, many gets; skipped versions are no-ops)
In `async` mode step k+1's rollouts are already queued on the samplers while the learner trains on step k; a batch
is never more than `max_staleness` versions behind, and the PPO ratio uses the sampler's own log-probs. Because each
sampler executes its calls in order, a weight push queued behind a `generate` never lands inside that batch; every
batch is checked to carry exactly one policy version.

Checkpoints (every N steps, at the end, on SIGTERM) hold model + optimizer + RNG + data position; `resume=True`
continues from the newest complete one exactly (same next-step loss on CPU).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from actors.sampler import Sampler
from gating.teacher import Gating
from learner.learner import Learner
from vzero import checkpoint as ckpt
from vzero.cluster import call_with_retry, check_resources, connect, spawn, wait_ready
from vzero.config import TrainConfig, dump_config
from vzero.console import progress_line, ray_logs_dir, summary
from vzero.data.quarantine import QuarantineWriter
from vzero.data.stream import PromptStream
from vzero.metrics_log import MetricsLog
from vzero.preflight import prepare_inputs
from vzero.records import Prompt, Trajectory
from vzero.runtime import derive_seed
from vzero.telemetry import Telemetry
from vzero.trajectory_log import write_step

log = logging.getLogger("vzero")


@dataclass
class InFlight:
    """A step whose rollouts have been submitted but not consumed yet."""

    step: int
    prompts: list[Prompt]
    version: int  # the policy version every trajectory of this step must carry
    chunks: list[list[Prompt]]  # per sampler
    seeds: list[int]
    refs: list[Any]
    submitted_at: float
    gated: Any = None  # (trajectories, stats) once gated
    rollout_stats: dict[str, float] = field(default_factory=dict)


class Run:
    """Holds the actors and the loop state of one training job."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        self.cfg = cfg
        prepare_inputs(cfg)  # data, model dirs, engines, resources: a user error stops here, before Ray starts
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_config(cfg))
        connect(cfg)
        check_resources(cfg)
        self.samplers = [
            spawn(Sampler, cfg.rollout.resources, f"vzero-sampler-{i}-{id(self):x}", cfg, i)
            for i in range(cfg.rollout.num_samplers)
        ]
        self.gaters = [
            spawn(Gating, cfg.teacher.resources, f"vzero-gating-{i}-{id(self):x}", cfg, i)
            for i in range(cfg.teacher.num_actors)
        ]
        self.learner = spawn(Learner, cfg.learner.resources, f"vzero-learner-{id(self):x}", cfg)
        named = {f"sampler-{i}": a for i, a in enumerate(self.samplers)}
        named.update({f"gating-{i}": a for i, a in enumerate(self.gaters)})
        named["learner"] = self.learner
        self.engines = wait_ready(named)
        log.info("actors ready: %s", "; ".join(self.engines.values()))
        self.transport = self._resolve_transport()
        self.quarantine = QuarantineWriter(self.out / "quarantine.parquet")
        self.stream = PromptStream(
            cfg.data.path,
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
            max_pixels=cfg.data.max_image_pixels,
            quarantine=self.quarantine,
        )
        self.metrics = MetricsLog(self.out, tensorboard=cfg.logging.tensorboard)
        self.telemetry = Telemetry(enabled=cfg.logging.ray_metrics)
        self.step = 0
        self.version = 0
        self.weight_refs: dict[int, Any] = {}  # recent published versions (async may need an older one again)
        self.faults = 0  # actor deaths / restarts the loop recovered from
        self.pushed_version = 0  # what the samplers hold (lags self.version when learner.weight_push_every > 1)
        self.stop_requested = False
        if resume:
            self._resume()

    # -- checkpoint / resume ----------------------------------------------------------------------------------
    def _resume(self) -> None:
        latest = ckpt.latest_checkpoint(self.out / "checkpoints")
        if latest is None:
            log.warning("resume: no complete checkpoint under %s; starting from scratch", self.out / "checkpoints")
            return
        state = json.loads((latest / "trainer_state.json").read_text())
        self.version = ray.get(self.learner.load.remote(str(latest)))
        self.step = int(state["step"])
        self.stream.load_state_dict(state["stream"])
        random.setstate(_tuplify(state["python_rng"]))
        np.random.set_state(_np_state(state["numpy_rng"]))
        self._publish_weights()
        self._push_all()
        log.info("resumed from %s (step %d, policy version %d)", latest, self.step, self.version)

    def save_checkpoint(self) -> Path:
        tmp = ckpt.begin(self.out / "checkpoints", self.step)
        ray.get(self.learner.save.remote(str(tmp)))
        state = {
            "step": self.step,
            "policy_version": self.version,
            "stream": self.stream.state_dict(),
            "python_rng": random.getstate(),
            "numpy_rng": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        return ckpt.commit(tmp, self.cfg.checkpoint.keep_last)

    # -- weights ------------------------------------------------------------------------------------------------
    def _publish_weights(self) -> None:
        """One put of the learner's current state into the object store (samplers get it from there)."""
        self.weight_refs[self.version] = self.learner.state_for_push.remote(self.transport)
        keep = self.version - self.cfg.max_staleness - 1
        self.weight_refs = {v: r for v, r in self.weight_refs.items() if v >= keep}

    def _push_one(self, sampler: Any, version: int | None = None) -> Any:
        version = self.version if version is None else version
        return sampler.update_weights.remote(self.weight_refs[version], version)

    def _resolve_transport(self) -> str:
        """`auto`: CUDA IPC when every sampler sits on the learner's GPU (zero copy), else the object store."""
        wanted = self.cfg.learner.weight_transport
        if wanted != "auto":
            return wanted
        learner_gpu = ray.get(self.learner.device_uuid.remote())
        sampler_gpus = ray.get([s.device_uuid.remote() for s in self.samplers])
        return "cuda_ipc" if learner_gpu and all(u == learner_gpu for u in sampler_gpus) else "object_store"

    def _count_fault(self) -> None:
        self.faults += 1

    def _restore_sampler(self, i: int, version: int) -> None:
        """A restarted sampler is back at the initial weights (version 0): bring it to `version`."""
        self.faults += 1
        if version > 0:
            ray.get(self._push_one(self.samplers[i], version))

    def _push_all(self) -> dict[str, float]:
        self.pushed_version = self.version
        t0 = time.perf_counter()
        results = call_with_retry(
            lambda: [self._push_one(s) for s in self.samplers], what="weight push", on_restart=None
        )
        seconds = time.perf_counter() - t0
        self.learner.release_push.remote()  # every sampler has loaded it: IPC buckets may go
        nbytes = max((r.get("bytes", 0.0) for r in results), default=0.0)
        return {
            "weight_push/seconds": seconds,
            "weight_push/load_seconds_max": max(r["seconds"] for r in results),
            "weight_push/gb": nbytes / 1e9,
            "weight_push/gb_per_s": nbytes / 1e9 / seconds if seconds > 0 else 0.0,
            "sampler/min_version": min(r["version"] for r in results),
            "weight_push/transport_ipc": float(self.transport == "cuda_ipc"),
        }

    # -- stages -------------------------------------------------------------------------------------------------
    def _submit_rollout(self, step: int) -> InFlight:
        prompts = self.stream.next_batch(self.cfg.rollout.prompts_per_step)
        k = len(self.samplers)
        chunks = [prompts[i::k] for i in range(k)]
        seeds = [derive_seed(self.cfg.seed, "rollout", step, i) for i in range(k)]
        refs = [
            s.generate.remote(c, seed=sd) if c else None for s, c, sd in zip(self.samplers, chunks, seeds, strict=True)
        ]
        return InFlight(step, prompts, self.pushed_version, chunks, seeds, refs, time.perf_counter())

    def _collect_rollout(self, job: InFlight) -> list[Trajectory]:
        trajectories: list[Trajectory] = []
        seconds, tokens = 0.0, 0.0
        for i, (chunk, ref) in enumerate(zip(job.chunks, job.refs, strict=True)):
            if ref is None:
                continue

            # A sampler that died mid-call is restarted by Ray: give it this batch's weights, then the same prompts
            # and seed (nothing lost, nothing duplicated). One that died between calls answers with version 0.
            def submit(i=i, chunk=chunk) -> Any:
                return self.samplers[i].generate.remote(chunk, seed=job.seeds[i])

            def restarted(i=i) -> None:
                self._restore_sampler(i, job.version)

            what = f"sampler-{i} generate (step {job.step})"
            trajs, st = call_with_retry(submit, what=what, on_restart=restarted, first=ref)
            if trajs[0].policy_version != job.version:  # restarted silently between two calls
                log.warning("%s: sampler came back at version %d; re-pushing", what, trajs[0].policy_version)
                self._restore_sampler(i, job.version)
                trajs, st = call_with_retry(submit, what=what, on_restart=restarted)
            if self.pushed_version > job.version and self.faults:  # async: pushes queued on the dead actor were lost
                ray.get(self._push_one(self.samplers[i], self.pushed_version))
            trajectories.extend(trajs)
            seconds = max(seconds, st["seconds"])
            tokens += st["tokens"]
        wall = time.perf_counter() - job.submitted_at
        versions = {t.policy_version for t in trajectories}
        if len(versions) != 1:
            raise RuntimeError(f"step {job.step}: trajectories from several policy versions {sorted(versions)}")
        expected = len(job.prompts) * self.cfg.rollout.n
        if len(trajectories) != expected or len({(t.uid, t.sample_index) for t in trajectories}) != expected:
            raise RuntimeError(f"step {job.step}: expected {expected} distinct trajectories, got {len(trajectories)}")
        job.rollout_stats = {
            "rollout/tokens": tokens,
            "rollout/seconds": seconds,
            "rollout/tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "rollout/wall_seconds": wall,
            "rollout/mean_response_len": tokens / max(1, len(trajectories)),
            "rollout/stop_frac": sum(t.finish_reason == "stop" for t in trajectories) / max(1, len(trajectories)),
        }
        return trajectories

    def _submit_gating(self, job: InFlight, trajectories: list[Trajectory]) -> list[Any]:
        """Route every trajectory of a prompt to the same gating actor (its views are built once there)."""
        k = len(self.gaters)
        owner = {p.uid: derive_seed("gate-route", p.uid) % k for p in job.prompts}
        parts = [[t for t in trajectories if owner[t.uid] == i] for i in range(k)]
        prompts = {p.uid: p for p in job.prompts}
        job.gated = [(i, part, prompts) for i, part in enumerate(parts) if part]
        return [self.gaters[i].gate.remote(part, prompts) for i, part, _ in job.gated]

    def _collect_gating(self, job: InFlight, refs: list[Any]) -> tuple[list[Trajectory], dict[str, float]]:
        out: list[Trajectory] = []
        stats: dict[str, float] = {}
        for (i, part, prompts), ref in zip(job.gated, refs, strict=True):

            def submit(i=i, part=part, prompts=prompts) -> Any:
                return self.gaters[i].gate.remote(part, prompts)

            trajs, st = call_with_retry(
                submit, what=f"gating-{i} (step {job.step})", on_restart=self._count_fault, first=ref
            )
            out.extend(trajs)
            for key, v in st.items():  # several gating actors: token counts add up, the rest is averaged
                stats[key] = stats.get(key, 0.0) + (v if key.endswith("tokens") else v / len(job.gated))
        out.sort(key=lambda t: (t.uid, t.sample_index))  # deterministic order whatever the routing
        return out, stats

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        depth = cfg.max_staleness if cfg.mode == "async" else 0
        inflight: deque[InFlight] = deque()
        next_step = self.step
        signal.signal(signal.SIGTERM, self._on_sigterm)
        pending_gate: tuple[InFlight, list[Any]] | None = None
        try:
            while self.step < cfg.steps and not self.stop_requested:
                while next_step < cfg.steps and len(inflight) < depth + 1:
                    inflight.append(self._submit_rollout(next_step))
                    next_step += 1
                job = inflight.popleft()
                t_step = time.perf_counter()
                if pending_gate is not None and pending_gate[0] is job:
                    gate_refs = pending_gate[1]
                else:
                    gate_refs = self._submit_gating(job, self._collect_rollout(job))
                pending_gate = None
                trajectories, gate_stats = self._collect_gating(job, gate_refs)
                prompts = {p.uid: p for p in job.prompts}
                train_ref = self.learner.train_step.remote(trajectories, prompts)
                if inflight:  # async: gate the next batch while the learner trains on this one
                    nxt = inflight[0]
                    pending_gate = (nxt, self._submit_gating(nxt, self._collect_rollout(nxt)))
                train_metrics = ray.get(train_ref)
                if int(train_metrics["policy_version"]) != self.version + 1:
                    raise RuntimeError(
                        "the learner restarted and lost its trained weights (policy version "
                        f"{train_metrics['policy_version']:.0f}, expected {self.version + 1}); rerun with --resume to "
                        "continue from the last checkpoint"
                    )
                self.version = int(train_metrics["policy_version"])
                self.step = job.step + 1
                push = {}
                if self.step % cfg.learner.weight_push_every == 0 or self.step == cfg.steps:
                    self._publish_weights()
                    push = self._push_all()
                metrics = self._step_metrics(job, trajectories, gate_stats, train_metrics, push, t_step)
                if cfg.logging.save_trajectories:
                    write_step(self.out / "trajectories", job.step, trajectories)
                record = self.metrics.log(self.step, metrics, trajectories)
                self.telemetry.record(record, [t.weight for t in trajectories])
                if cfg.logging.progress_bar:
                    print(progress_line(self.step, cfg.steps, metrics), flush=True)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
            final = self.save_checkpoint()
        finally:
            self.metrics.close()
            self.quarantine.close()
        return final

    def _step_metrics(self, job, trajectories, gate_stats, train_metrics, push, t_step) -> dict[str, float]:
        m: dict[str, float] = {"policy_version": self.version}
        m["loss"] = train_metrics.get("loss", 0.0)
        m.update(train_metrics)
        m.update(job.rollout_stats)
        m.update(gate_stats)
        m.update(push)
        if not push:
            m["weight_push/seconds"] = 0.0
        m["staleness"] = float(self.version - 1 - trajectories[0].policy_version)
        m["data/quarantined"] = float(self.stream.quarantined)
        m["faults/recovered"] = float(self.faults)
        m["data/epoch"] = float(self.stream.state_dict().get("epoch", 0))
        m["step/seconds"] = time.perf_counter() - t_step
        m["trajectories"] = float(len(trajectories))
        return m

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM: finishing the current step, writing a checkpoint, then stopping")
        self.stop_requested = True

    def shutdown(self) -> None:
        for a in [*self.samplers, *self.gaters, self.learner]:
            ray.kill(a, no_restart=True)


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _np_state(x: list[Any]) -> tuple:
    return (x[0], np.asarray(x[1], dtype=np.uint32), *x[2:])


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Run a whole job; returns the final checkpoint directory."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    owns_cluster = not ray.is_initialized() and not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    t0 = time.perf_counter()
    run = Run(cfg, resume=resume)
    logs_dir = ray_logs_dir() if owns_cluster else None
    try:
        final = run.run()
    finally:
        run.shutdown()
        if owns_cluster:  # flush the actors' last log lines before the summary, and free the local cluster
            ray.shutdown()
    out = run.out
    lg = cfg.logging
    print(
        summary(
            out,
            steps=run.step,
            checkpoint=final,
            seconds=time.perf_counter() - t0,
            quarantined=run.stream.quarantined,
            trajectories=lg.save_trajectories,
            tensorboard=lg.tensorboard,
            logs_dir=logs_dir,
        ),
        flush=True,
    )
    print(json.dumps({"output_dir": str(out), "checkpoint": str(final), "steps": run.step}), flush=True)
    return final
