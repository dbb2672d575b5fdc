"""The V-Zero recipe on Ray: setup -> step loop (sample -> gate -> learn -> push weights) -> cleanup.

`train(cfg)` is what `vzero train` runs. One step, in order:
  1. prompts   = stream.next_batch(rollout.prompts_per_step)            (Parquet rows, `answer` never read)
  2. samples   = samplers.generate(prompts)      n trajectories/prompt on the full image, with sampler log-probs
  3. gated     = gating.gate(samples)             teacher replay on positive + negative views -> gate weights
  4. metrics   = learner.train_step(gated)        gated distillation loss, AdamW step, policy version + 1
  5. push      learner weights -> every sampler   (vzero/pushes.py: CUDA IPC on the learner's GPU, a collective
                                                  broadcast to other GPUs / CPU samplers, or the object store)
`sync` is strictly on-policy: every batch is sampled by the weights it is trained on (staleness 0). In `async` mode
later steps' rollouts are already queued on the samplers while the learner trains; with weight_push_every = k the
driver keeps max_staleness - k + 1 steps in flight, so a batch is never more than `max_staleness` versions behind
(checked every step), and the PPO ratio uses the sampler's own log-probs. Because each sampler executes its calls in
order, a weight push queued behind a `generate` never lands inside that batch; every batch is checked to carry
exactly one policy version.

Checkpoints (every N steps, at the end, on SIGTERM) hold model + optimizer + RNG + the data position of the first
prompt not yet trained, plus (async) the sampled trajectories of the steps still in flight; weights are pushed at
every checkpoint step. So `resume=True` continues from the newest complete one exactly, in both modes: the same
prompts, the same samples and policy versions, the same next-step loss on CPU.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from actors.sampler import Sampler
from gating.gate import GateTerms, gate_metrics
from gating.teacher import TERMS_KEY, Gating, merge_stats
from learner.group import LearnerGroup
from learner.learner import Learner
from vzero import checkpoint as ckpt
from vzero import fault_points, run_dir, stops
from vzero.cluster import call_with_retry, check_resources, connect, spawn, wait_ready
from vzero.config import ConfigError, RolloutConfig, TeacherConfig, TrainConfig, dump_config
from vzero.console import progress_line, ray_logs_dir, summary
from vzero.data.quarantine import QuarantineWriter
from vzero.data.stream import PromptStream
from vzero.errors import RunStopped
from vzero.loop_state import (
    InFlight,
    host_rng_state,
    restore_trajectories,
    rollout_record,
    set_host_rng_state,
)
from vzero.metrics_log import MetricsLog
from vzero.models.compat import TokenizerMismatchError, check_same_tokenizer
from vzero.placement import engine_strategy
from vzero.preflight import prepare_inputs
from vzero.pushes import WeightPusher
from vzero.records import Trajectory
from vzero.runtime import derive_seed
from vzero.telemetry import Telemetry
from vzero.trajectory_log import write_step

log = logging.getLogger("vzero")


class Run:
    """Holds the actors and the loop state of one training job."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        prepare_inputs(cfg)  # data, model dirs, engines, resources: a user error stops here, before Ray starts
        self.out = Path(cfg.output_dir)
        if resume and overwrite:
            raise ConfigError("--resume continues the run in output_dir and --overwrite deletes it: pass only one")
        if not resume:
            run_dir.prepare_fresh(self.out, overwrite=overwrite)
        self.out.mkdir(parents=True, exist_ok=True)
        _check_tokenizers(cfg)
        (self.out / "config.yaml").write_text(dump_config(cfg))
        connect(cfg)
        check_resources(cfg)
        self.placement_groups: list[Any] = []  # of tensor-parallel engines (vzero/placement.py); removed at shutdown
        names = [f"vzero-sampler-{i}-{id(self):x}" for i in range(cfg.rollout.num_samplers)]
        self.samplers = [
            spawn(Sampler, cfg.rollout.resources, n, cfg, i, placement=self._engine_placement(cfg.rollout, n))
            for i, n in enumerate(names)
        ]
        names = [f"vzero-gating-{i}-{id(self):x}" for i in range(cfg.teacher.num_actors)]
        self.gaters = [
            spawn(Gating, cfg.teacher.resources, n, cfg, i, placement=self._engine_placement(cfg.teacher, n))
            for i, n in enumerate(names)
        ]
        name = f"vzero-learner-{id(self):x}"  # world_size > 1: N FSDP ranks behind the same methods (a facade)
        one = cfg.learner.world_size == 1
        no_restart = cfg.learner.resources.model_copy(update={"max_restarts": 0})  # its death stops the run (stops.py)
        self.learner = spawn(Learner, no_restart, name, cfg) if one else LearnerGroup(cfg, name)
        named = {f"sampler-{i}": a for i, a in enumerate(self.samplers)}
        named.update({f"gating-{i}": a for i, a in enumerate(self.gaters)})
        named["learner"] = self.learner
        self.engines = wait_ready(named)
        log.info("actors ready: %s", "; ".join(self.engines.values()))
        self.pusher = WeightPusher(cfg, self.learner, self.samplers, on_fault=self._count_fault)
        latest = ckpt.latest_valid_checkpoint(self.out / "checkpoints") if resume else None  # skips damaged ones
        if resume:  # drop what steps after the checkpoint wrote (they are trained again)
            state = json.loads((latest / "trainer_state.json").read_text()) if latest else {"step": 0}
            run_dir.rewind_outputs(self.out, state["step"], state.get("stream", {}).get("bad_rows", []))
        self.quarantine = QuarantineWriter(self.out / "quarantine.parquet", mode="a" if latest else "w")
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
        self.faults = 0  # actor deaths / restarts the loop recovered from
        self.pushed_version = 0  # what the samplers hold (lags self.version when learner.weight_push_every > 1)
        self.inflight: deque[InFlight] = deque()  # submitted steps not trained yet, oldest first
        self.saved: tuple[int, Path] | None = None  # (step, directory) of the last checkpoint written or loaded
        self.stop_requested = False
        if latest is not None:
            self._resume(latest)
        elif resume:
            log.warning("resume: no complete checkpoint under %s; starting from scratch", self.out / "checkpoints")

    # -- checkpoint / resume ----------------------------------------------------------------------------------
    def _resume(self, latest: Path) -> None:
        state = json.loads((latest / "trainer_state.json").read_text())
        self.version = ray.get(self.learner.load.remote(str(latest)))
        self.step = int(state["step"])
        self.stream.load_state_dict(state["stream"])
        set_host_rng_state(state)
        self.inflight = self._restore_rollouts(ckpt.load_rollouts(latest))
        self.saved = (self.step, latest)
        self._publish_weights()
        self._push_all()
        log.info(
            "resumed from %s (step %d, policy version %d, %d step(s) in flight restored)",
            latest,
            self.step,
            self.version,
            len(self.inflight),
        )

    def _restore_rollouts(self, records: list[dict[str, Any]]) -> deque[InFlight]:
        """Re-draw the prompts of the checkpoint's in-flight steps (the stream was rewound to the first of them) and
        attach their stored samples. One that no longer fits the config is sampled again, with the rest after it."""
        cfg, jobs = self.cfg, deque()
        bound = cfg.max_staleness if cfg.mode == "async" else 0
        for rec in (r for r in records if r["step"] < cfg.steps):
            before = self.stream.position_dict()
            prompts = self.stream.next_batch(cfg.rollout.prompts_per_step)
            trajs = restore_trajectories(rec, prompts, n=cfg.rollout.n, staleness=bound)
            if trajs is None:
                log.warning("resume: the stored samples of step %d do not fit this config; sampling again", rec["step"])
                self.stream.load_state_dict(self.stream.state_dict(before))
                break
            job = InFlight(rec["step"], prompts, rec["version"], [], [], [], time.perf_counter(), before, trajs)
            job.rollout_stats = rec["rollout_stats"]
            jobs.append(job)
        return jobs

    def save_checkpoint(self) -> Path:
        self.quarantine.flush()  # the rows the checkpoint's stream knows are on disk before the checkpoint exists
        with ckpt.writing(self.out / "checkpoints", self.step) as tmp:  # removed if the write fails (a full disk)
            ray.get(self.learner.save.remote(str(tmp)))
            fault_points.reached("checkpoint", self.step)
            jobs = list(self.inflight)
            for job in jobs:  # sampled by weights no checkpoint holds: keep the samples themselves
                self._collect_rollout(job)
            state = {
                "step": self.step,
                "policy_version": self.version,
                "pushed_version": self.pushed_version,
                # the first prompt not yet trained: in-flight steps drew theirs already, and are re-drawn on resume
                "stream": self.stream.state_dict(jobs[0].stream_before if jobs else None),
                **host_rng_state(),
            }
            if jobs:
                ckpt.save_rollouts(tmp, [rollout_record(j) for j in jobs])
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            final = ckpt.commit(tmp, self.cfg.checkpoint.keep_last)
        self.saved = (self.step, final)
        return final

    # -- weights (vzero/pushes.py: transports, the collective protocol, timeouts, what is kept) ------------------
    def _publish_weights(self) -> None:
        self.pusher.publish(self.version)

    def _prune_pushes(self) -> None:
        """Keep exactly the pushes a retry may still send; the learner frees the others' buckets."""
        self.pusher.prune(list(self.inflight), self.pushed_version)

    def _push_one(self, i: int, version: int | None = None) -> dict[str, float]:
        """Bring sampler i to `version` (blocking)."""
        return self.pusher.push([i], self.version if version is None else version)[0]

    def _count_fault(self) -> None:
        self.faults += 1

    def _restore_sampler(self, i: int, version: int) -> None:
        """A restarted sampler is back at the initial weights (version 0): bring it to `version`."""
        if version > 0:
            self._push_one(i, version)

    def _push_all(self) -> dict[str, float]:
        self.pushed_version = self.version
        metrics = self.pusher.push_all(self.version)
        self._prune_pushes()  # every sampler has loaded it
        return metrics

    # -- stages -------------------------------------------------------------------------------------------------
    def _submit_rollout(self, step: int) -> InFlight:
        before = self.stream.position_dict()
        prompts = self.stream.next_batch(self.cfg.rollout.prompts_per_step)
        k = len(self.samplers)
        chunks = [prompts[i::k] for i in range(k)]
        seeds = [derive_seed(self.cfg.seed, "rollout", step, i) for i in range(k)]
        refs = [
            s.generate.remote(c, seed=sd) if c else None for s, c, sd in zip(self.samplers, chunks, seeds, strict=True)
        ]
        return InFlight(step, prompts, self.pushed_version, chunks, seeds, refs, time.perf_counter(), before)

    def _collect_rollout(self, job: InFlight) -> list[Trajectory]:
        if job.trajectories is not None:  # collected already (a checkpoint needed it) or restored from one
            return job.trajectories
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
            fatal = lambda exc: stops.died(exc, self.learner)  # noqa: E731 (the learner's weights are in the call)
            retry = dict(what=what, on_restart=restarted, on_fault=self._count_fault, fatal=fatal)
            trajs, st = call_with_retry(submit, first=ref, **retry)
            if trajs[0].policy_version != job.version:  # restarted silently between two calls
                log.warning("%s: sampler came back at version %d; re-pushing", what, trajs[0].policy_version)
                self._count_fault()
                self._restore_sampler(i, job.version)
                trajs, st = call_with_retry(submit, **retry)
            if self.pushed_version > job.version and self.faults:  # async: pushes queued on the dead actor were lost
                self._push_one(i, self.pushed_version)
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
        job.trajectories = trajectories
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
        parts: list[dict[str, float]] = []
        terms: list[GateTerms] = []
        for (i, part, prompts), ref in zip(job.gated, refs, strict=True):

            def submit(i=i, part=part, prompts=prompts) -> Any:
                return self.gaters[i].gate.remote(part, prompts)

            trajs, st = call_with_retry(
                submit, what=f"gating-{i} (step {job.step})", first=ref, on_fault=self._count_fault
            )
            out.extend(trajs)
            terms.append(st.pop(TERMS_KEY))
            parts.append(st)
        out.sort(key=lambda t: (t.uid, t.sample_index))  # deterministic order whatever the routing
        gate = self.cfg.gate
        return out, {**merge_stats(parts), **gate_metrics(terms, w_min=gate.w_min, enabled=gate.enabled)}

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        # A batch submitted d steps ahead, at a version up to k - 1 pushes old, lags d + k - 1 versions at most.
        depth = cfg.max_staleness - cfg.learner.weight_push_every + 1 if cfg.mode == "async" else 0
        bound = cfg.max_staleness if cfg.mode == "async" else 0
        inflight = self.inflight
        next_step = self.step + len(inflight)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        pending_gate: tuple[InFlight, list[Any]] | None = None
        with stops.reported(self):  # a full disk, a dead learner: one message that says what to do
            while self.step < cfg.steps and not self.stop_requested:
                while next_step < cfg.steps and len(inflight) < depth + 1:
                    inflight.append(self._submit_rollout(next_step))
                    next_step += 1
                job = inflight.popleft()
                fault_points.reached("rollout", job.step + 1)
                t_step = time.perf_counter()
                if pending_gate is not None and pending_gate[0] is job:
                    gate_refs = pending_gate[1]
                else:
                    gate_refs = self._submit_gating(job, self._collect_rollout(job))
                pending_gate = None
                trajectories, gate_stats = self._collect_gating(job, gate_refs)
                prompts = {p.uid: p for p in job.prompts}
                train_ref = self.learner.train_step.remote(trajectories, prompts)
                fault_points.reached("learn", job.step + 1)
                if inflight:  # async: gate the next batch while the learner trains on this one
                    nxt = inflight[0]
                    pending_gate = (nxt, self._submit_gating(nxt, self._collect_rollout(nxt)))
                train_metrics = ray.get(train_ref)
                if int(train_metrics["policy_version"]) != self.version + 1:  # it restarted (never: max_restarts 0)
                    raise RunStopped(f"{stops.resume_hint(self.step, self.saved)}: the learner lost its weights")
                self.version = int(train_metrics["policy_version"])
                self.step = job.step + 1
                if self.version - 1 - job.version > bound:  # by construction never; a bug if it ever fires
                    raise RuntimeError(
                        f"step {self.step}: batch of policy version {job.version} trained by version "
                        f"{self.version - 1}, beyond the staleness bound {bound} of mode={cfg.mode}"
                    )
                checkpoint_due = bool(cfg.checkpoint.every) and self.step % cfg.checkpoint.every == 0
                push = {}
                # Pushing at checkpoint steps too makes the samplers of a resumed run hold what they held here.
                if self.step % cfg.learner.weight_push_every == 0 or self.step == cfg.steps or checkpoint_due:
                    self._publish_weights()
                    push = self._push_all()
                metrics = self._step_metrics(job, trajectories, gate_stats, train_metrics, push, t_step)
                if cfg.logging.save_trajectories:  # numbered like metrics and checkpoints: after step N, file N
                    write_step(self.out / "trajectories", self.step, trajectories)
                record = self.metrics.log(self.step, metrics, trajectories)
                self.telemetry.record(record, [t.weight for t in trajectories])
                if cfg.logging.progress_bar:
                    print(progress_line(self.step, cfg.steps, metrics), flush=True)
                fault_points.reached("logged", self.step)
                if checkpoint_due and self.step < cfg.steps:
                    self.save_checkpoint()
            final = self.saved[1] if self.saved and self.saved[0] == self.step else self.save_checkpoint()
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

    def _engine_placement(self, role: RolloutConfig | TeacherConfig, name: str) -> Any:
        strategy = engine_strategy(role.resources, role.vllm, name)
        if strategy is not None:
            self.placement_groups.append(strategy.placement_group)
        return strategy

    def shutdown(self) -> None:
        for a in [*self.samplers, *self.gaters]:
            ray.kill(a, no_restart=True)
        if isinstance(self.learner, LearnerGroup):
            self.learner.shutdown()
        else:
            ray.kill(self.learner, no_restart=True)
        for pg in self.placement_groups:
            ray.util.remove_placement_group(pg)


def _check_tokenizers(cfg: TrainConfig) -> None:
    """A separate teacher must share the student's token ids (it replays the student's responses id by id)."""
    if cfg.teacher.model is None:
        return
    try:
        check_same_tokenizer(
            cfg.student.path,
            cfg.teacher.model.path,
            student_remote_code=cfg.student.trust_remote_code,
            teacher_remote_code=cfg.teacher.model.trust_remote_code,
        )
    except TokenizerMismatchError as exc:
        raise ConfigError(f"teacher.model.path: {exc}") from None


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run a whole job; returns the final checkpoint directory.

    A fresh run into an output_dir that holds a run raises ConfigError unless `overwrite` (which deletes that run's
    outputs first); `resume` of a run that already reached `steps` says so and returns, starting nothing."""
    out = Path(cfg.output_dir)
    done = run_dir.finished_checkpoint(out, cfg.steps) if resume and not overwrite else None
    if done is not None:
        print(
            f"V-Zero run in {out} is already finished: its checkpoint {done.name} reached steps={cfg.steps}; "
            "nothing to do (raise steps to train further)",
            flush=True,
        )
        print(json.dumps({"output_dir": str(out), "checkpoint": str(done), "steps": ckpt.checkpoint_step(done)}))
        return done
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    owns_cluster = not ray.is_initialized() and not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    t0 = time.perf_counter()
    run = Run(cfg, resume=resume, overwrite=overwrite)
    logs_dir = ray_logs_dir() if owns_cluster else None
    try:
        final = run.run()
    finally:
        run.shutdown()
        if owns_cluster:  # flush the actors' last log lines before the summary, and free the local cluster
            ray.shutdown()
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
