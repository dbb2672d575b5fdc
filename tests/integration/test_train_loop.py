"""The rollout-and-learn loop on a real local Ray cluster: 2 samplers + 1 gating + 1 learner actor, tiny models.

Invariants checked from what the run writes (metrics.jsonl, trajectories/*.parquet, checkpoints/):
every step has the interface keys; samplers report the new policy version after each push; each batch comes from
one policy version (staleness 0 in sync, <= max_staleness in async, also with weight_push_every > 1); the logged
gate weights equal `evidence_weights` recomputed from the logged teacher log-probs, and the logged gate statistics
those of all the step's trajectories (two gating actors); the weights actually move; resuming from a checkpoint
reproduces the next step's loss exactly, in sync and in async mode (same prompts, samples and versions).
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from gating.gate import evidence_weights
from tests.conftest import INTERFACE_KEYS, tiny_config
from vzero.metrics_log import read_metrics
from vzero.runtime import derive_seed

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REQUIRED_KEYS = INTERFACE_KEYS | {
    "weight_push/gb_per_s",
    "learner/tokens_per_s",
    "staleness",
    "data/quarantined",
}


def _run(cfg, resume=False):
    from vzero.driver import train

    return train(cfg, resume=resume)


def _gate_from_logs(table, cfg, diagnostics: bool = False):
    rows = table.to_pylist()
    pos = [r["lp_pos"] for r in rows]
    neg = [r["lp_neg"] for r in rows]
    T = max(len(p) for p in pos)
    P = torch.zeros(len(rows), T)
    N = torch.zeros(len(rows), T)
    M = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (p, n) in enumerate(zip(pos, neg, strict=True)):
        P[i, : len(p)] = torch.tensor(p)
        N[i, : len(n)] = torch.tensor(n)
        M[i, : len(p)] = True
    g = cfg.gate
    w, diag = evidence_weights(
        P,
        N,
        M,
        [r["uid"] for r in rows],
        gamma=g.gamma,
        alpha=g.alpha,
        w_min=g.w_min,
        w_max=g.w_max,
        eps=g.eps,
        level=g.level,
    )
    if diagnostics:  # (weights, the gate's diagnostics over every logged trajectory)
        return w.numpy(), diag
    return w.numpy(), np.array([r["weight"] for r in rows], dtype=np.float32)


def test_sync_loop_vllm_engines(ray_local, tiny_model, synth_data, tmp_path) -> None:
    """Sync mode, the default engine (vLLM where installed): versions advance, gate weights are reproducible."""
    cfg = tiny_config(tmp_path, tiny_model, synth_data, "mode=sync", "checkpoint.every=1", "checkpoint.keep_last=3")
    final = _run(cfg)
    out = Path(cfg.output_dir)
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert set(m) >= REQUIRED_KEYS, REQUIRED_KEYS - set(m)
        assert m["policy_version"] == m["step"]
        assert m["sampler/min_version"] == m["step"], "every sampler reports the new version after the push"
        assert m["staleness"] == 0
        assert np.isfinite(m["loss"]) and m["weight_push/seconds"] > 0 and m["rollout/tokens_per_s"] > 0
        assert m["trajectories"] == cfg.rollout.prompts_per_step * cfg.rollout.n
    for step in (1, 2, 3):  # trajectory files are numbered like the metrics and checkpoints
        table = pq.read_table(out / "trajectories" / f"step_{step:06d}.parquet")
        assert set(table.column("policy_version").to_pylist()) == {step - 1}
        assert set(table.column("step").to_pylist()) == {step}
        recomputed, logged = _gate_from_logs(table, cfg)
        np.testing.assert_allclose(logged, recomputed, atol=1e-6)
        assert metrics[step - 1]["gate/weight_mean"] == pytest.approx(float(recomputed.mean()), abs=1e-6)
    assert final.name == "step_000003" and (final / "COMPLETE").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002", "step_000003"]
    _weights_move(tiny_model, out, table)
    _samplers_served_the_pushed_weights(tiny_model, out)


def _student_logprobs(model_dir: Path, out: Path, rows: list[dict]) -> list[torch.Tensor]:
    """Teacher-forced student log-probs (transformers) of logged trajectories under the model in `model_dir`."""
    from vzero.images import decode_rgb
    from vzero.logprobs import response_logprobs
    from vzero.models.loading import load_model, load_processor
    from vzero.vlm_inputs import ImageEncoder, collate

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    images = {r["id"]: r["image"] for r in pq.read_table(cfg["data"]["path"], columns=["id", "image"]).to_pylist()}
    proc = load_processor(model_dir)
    encode = ImageEncoder(
        proc.image_processor, min_pixels=cfg["student"]["min_pixels"], max_pixels=cfg["student"]["max_pixels"]
    )
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    model = load_model(model_dir)
    out_lps = []
    for row in rows:
        batch = collate(
            [(row["prompt_ids"], encode(decode_rgb(images[row["uid"]])), row["response_ids"])],
            pad_id=0,
            image_pad_id=pad,
        )
        with torch.no_grad():
            out_lps.append(response_logprobs(model, batch).logprobs[0])
    return out_lps


def _weights_move(initial: Path, out: Path, table) -> None:
    """Student log-probs of one fixed trajectory differ between the initial model and every checkpoint."""
    row = table.to_pylist()[:1]
    lps = [
        _student_logprobs(d / "model" if (d / "model").is_dir() else d, out, row)[0]
        for d in [initial, *sorted((out / "checkpoints").iterdir())]
    ]
    for a, b in itertools.pairwise(lps):
        assert (a - b).abs().max() > 1e-6, "the student's weights changed between consecutive steps"


def _samplers_served_the_pushed_weights(initial: Path, out: Path) -> None:
    """Step k's trajectories were sampled by vLLM with the weights of checkpoint k: their sampler log-probs match
    that checkpoint's transformers log-probs, and not the initial model's (the in-place reload really happened)."""
    for step in (1, 2):  # the batch trained in step k + 1 was sampled by the weights saved after step k
        rows = pq.read_table(out / "trajectories" / f"step_{step + 1:06d}.parquet").to_pylist()[:4]
        pushed = _student_logprobs(out / "checkpoints" / f"step_{step:06d}" / "model", out, rows)
        before = _student_logprobs(initial, out, rows)
        for row, lp, lp0 in zip(rows, pushed, before, strict=True):
            old = torch.tensor(row["lp_old"])
            torch.testing.assert_close(old, lp[: len(old)], atol=2e-4, rtol=0)
            assert (old - lp0[: len(old)]).abs().max() > 1e-4


def _gate_metrics_pool_every_trajectory(cfg, out: Path, metrics: list[dict]) -> None:
    """Each step's gate/* statistics equal the gate's diagnostics over all of the step's logged trajectories, and
    the counts are sums, whichever gating actor each prompt went to (both actors must have had work)."""
    actors_used = set()
    for m in metrics:
        table = pq.read_table(out / "trajectories" / f"step_{m['step']:06d}.parquet")
        rows = table.to_pylist()
        _, diag = _gate_from_logs(table, cfg, diagnostics=True)
        for key, want in diag.items():
            assert m[f"gate/{key}"] == pytest.approx(want, abs=1e-6), (m["step"], key)
        modes = {r["uid"]: r["negative_mode"] for r in rows}
        assert m["teacher/fallback_negatives"] == sum(v != cfg.views.negative_mode for v in modes.values())
        assert m["teacher/tokens"] == sum(len(r["lp_pos"]) for r in rows)
        actors_used |= {derive_seed("gate-route", uid) % cfg.teacher.num_actors for uid in modes}
    assert actors_used == set(range(cfg.teacher.num_actors)), "the check needs prompts on every gating actor"


def test_resume_reproduces_the_next_step_exactly(ray_local, tiny_model, synth_data, tmp_path) -> None:
    """Kill-and-resume equality: a run stopped after step 2 and resumed gives step 3's loss bit for bit."""
    common = ("rollout.engine=transformers", "teacher.engine=transformers", "checkpoint.every=1")
    full = tiny_config(tmp_path / "full", tiny_model, synth_data, *common)
    _run(full)
    ref = read_metrics(Path(full.output_dir) / "metrics.jsonl")

    part = tiny_config(tmp_path / "part", tiny_model, synth_data, *common, "steps=2")
    _run(part)
    resumed = part.model_copy(update={"steps": 3})
    _run(resumed, resume=True)
    got = read_metrics(Path(part.output_dir) / "metrics.jsonl")
    assert [m["step"] for m in got] == [1, 2, 3]
    assert got[2]["loss"] == ref[2]["loss"]
    assert got[2]["gate/weight_mean"] == ref[2]["gate/weight_mean"]
    assert got[2]["learner/grad_norm"] == ref[2]["learner/grad_norm"]


def test_async_loop_bounded_staleness_and_exact_resume(ray_local, tiny_model, synth_data, tmp_path) -> None:
    """Async, max_staleness=2, weight_push_every=2: one step in flight (2 - 2 + 1), so batches lag 0, 1, 2, 1
    versions, never more than max_staleness. Two gating actors gate disjoint prompts, and every logged gate statistic
    is that of ALL the step's trajectories. Then the run "crashes" in step 4 (its step-4 checkpoint is removed) and
    is resumed from step 3 (a checkpoint, not a push step): the checkpoint resumes at the first prompt not yet
    trained, and the resumed step 4 trains the uninterrupted run's prompts, samples and policy version, with the
    same loss."""
    cfg = tiny_config(
        tmp_path,
        tiny_model,
        synth_data,
        "mode=async",
        "max_staleness=2",
        "learner.weight_push_every=2",
        "checkpoint.every=3",
        "steps=4",
        "rollout.engine=transformers",
        "teacher.engine=transformers",
        "teacher.num_actors=2",
    )
    _run(cfg)
    out = Path(cfg.output_dir)
    ref = read_metrics(out / "metrics.jsonl")
    assert [m["policy_version"] for m in ref] == [1, 2, 3, 4]
    assert [m["staleness"] for m in ref] == [0, 1, 2, 1]
    assert [m.get("sampler/min_version") for m in ref] == [None, 2, 3, 4], "pushes every 2 steps and at checkpoints"
    versions = [
        set(pq.read_table(out / "trajectories" / f"step_{s:06d}.parquet").column("policy_version").to_pylist())
        for s in (1, 2, 3, 4)
    ]
    assert versions == [{0}, {0}, {0}, {2}]
    _gate_metrics_pool_every_trajectory(cfg, out, ref)

    ref_rows = pq.read_table(out / "trajectories" / "step_000004.parquet").to_pylist()
    shutil.rmtree(out / "checkpoints" / "step_000004")  # as if the job died while checkpointing step 4
    _run(cfg, resume=True)
    got = read_metrics(out / "metrics.jsonl")
    got_rows = pq.read_table(out / "trajectories" / "step_000004.parquet").to_pylist()
    key = lambda r: (r["uid"], r["sample_index"])  # noqa: E731
    assert sorted(map(key, got_rows)) == sorted(map(key, ref_rows)), "step 4 trains the prompts it would have"
    for a, b in zip(sorted(got_rows, key=key), sorted(ref_rows, key=key), strict=True):
        assert (a["policy_version"], a["response_ids"], a["lp_old"]) == (
            b["policy_version"],
            b["response_ids"],
            b["lp_old"],
        )
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4, "metrics hold each step once"
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert got[3]["loss"] == ref[3]["loss"] and got[3]["staleness"] == ref[3]["staleness"]
    state = json.loads((out / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["stream"]["served"] == 3 * cfg.rollout.prompts_per_step, "the stream resumes after trained prompts"
