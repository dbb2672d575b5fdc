"""The rollout-and-learn loop on a real local Ray cluster: 2 samplers + 1 gating + 1 learner actor, tiny models.

Invariants checked from what the run writes (metrics.jsonl, trajectories/*.parquet, checkpoints/):
every step has the interface keys; samplers report the new policy version after each push; each batch comes from
one policy version (staleness 0 in sync, <= max_staleness in async); the logged gate weights equal
`evidence_weights` recomputed from the logged teacher log-probs; the weights actually move; resuming from a
checkpoint reproduces the next step's loss exactly.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from gating.gate import evidence_weights
from tests.conftest import INTERFACE_KEYS, tiny_config
from vzero.metrics_log import read_metrics

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


def _gate_from_logs(table, cfg) -> tuple[np.ndarray, np.ndarray]:
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
    w, _ = evidence_weights(
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
    for step in range(3):
        table = pq.read_table(out / "trajectories" / f"step_{step:06d}.parquet")
        assert set(table.column("policy_version").to_pylist()) == {step}
        recomputed, logged = _gate_from_logs(table, cfg)
        np.testing.assert_allclose(logged, recomputed, atol=1e-6)
        assert metrics[step]["gate/weight_mean"] == pytest.approx(float(recomputed.mean()), abs=1e-6)
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
    for step in (1, 2):
        rows = pq.read_table(out / "trajectories" / f"step_{step:06d}.parquet").to_pylist()[:4]
        pushed = _student_logprobs(out / "checkpoints" / f"step_{step:06d}" / "model", out, rows)
        before = _student_logprobs(initial, out, rows)
        for row, lp, lp0 in zip(rows, pushed, before, strict=True):
            old = torch.tensor(row["lp_old"])
            torch.testing.assert_close(old, lp[: len(old)], atol=2e-4, rtol=0)
            assert (old - lp0[: len(old)]).abs().max() > 1e-4


def test_async_loop_bounded_staleness(ray_local, tiny_model, synth_data, tmp_path) -> None:
    """Async mode: step k+1 is sampled while step k trains; every batch is exactly one version behind."""
    cfg = tiny_config(
        tmp_path,
        tiny_model,
        synth_data,
        "mode=async",
        "max_staleness=1",
        "rollout.engine=transformers",
        "teacher.engine=transformers",
    )
    _run(cfg)
    out = Path(cfg.output_dir)
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["policy_version"] for m in metrics] == [1, 2, 3]
    assert [m["staleness"] for m in metrics] == [0, 1, 1]
    assert [m["sampler/min_version"] for m in metrics] == [1, 2, 3]
    versions = [
        set(pq.read_table(out / "trajectories" / f"step_{s:06d}.parquet").column("policy_version").to_pylist())
        for s in range(3)
    ]
    assert versions == [{0}, {0}, {1}]


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
