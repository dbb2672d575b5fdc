"""metrics.jsonl, TensorBoard scalars + gate histograms, versions.json (vzero/metrics_log.py), read back for real."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vzero.metrics_log import MetricsLog, read_metrics
from vzero.records import Trajectory


def _traj(i: int, pos: list[float], neg: list[float], weight: float, token_weights=None) -> Trajectory:
    n = len(pos)
    return Trajectory(
        uid=f"u{i // 2}",
        sample_index=i % 2,
        policy_version=0,
        prompt_ids=[1, 2],
        response_ids=list(range(n)),
        lp_old=[-1.0] * n,
        finish_reason="stop",
        lp_pos=pos,
        lp_neg=neg,
        weight=weight,
        token_weights=token_weights,
    )


def test_tensorboard_gets_gate_weight_and_delta_histograms_and_versions_are_recorded(tmp_path) -> None:
    trajs = [
        _traj(0, [-1.0, -2.0], [-1.5, -1.0], 1.5, [1.2, 1.8]),
        _traj(1, [-3.0], [-1.0], 0.5, [0.5]),
        _traj(2, [-0.5, -0.5, -0.5], [-0.5, -0.75, -0.25], 1.0, [1.0, 1.0, 1.0]),
    ]
    log = MetricsLog(tmp_path, tensorboard=True)
    log.log(1, {"loss": 0.25, "gate/weight_mean": 1.0}, trajs)
    log.close()

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    assert {"gate/weight", "gate/delta", "gate/token_weight"} <= set(events.Tags()["histograms"])
    w = events.Histograms("gate/weight")[0].histogram_value
    assert (w.num, w.min, w.max, w.sum) == (3, 0.5, 1.5, 3.0)
    d = events.Histograms("gate/delta")[0].histogram_value
    deltas = np.array([0.5, -1.0, -2.0, 0.0, 0.25, -0.25])  # lp_pos - lp_neg, token by token
    assert d.num == 6 and d.min == deltas.min() and d.max == deltas.max()
    assert d.sum == pytest.approx(deltas.sum())
    assert events.Histograms("gate/token_weight")[0].histogram_value.num == 6
    assert [s.value for s in events.Scalars("loss")] == [0.25]

    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.25, "gate/weight_mean": 1.0}]
    versions = json.loads((tmp_path / "versions.json").read_text())
    assert {"python", "platform", "vzero", "torch", "transformers", "ray", "pyarrow"} <= set(versions)


def test_sequence_level_steps_get_no_token_weight_histogram(tmp_path) -> None:
    log = MetricsLog(tmp_path, tensorboard=True)
    log.log(1, {"loss": 0.0}, [_traj(0, [-1.0], [-2.0], 1.0)])
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    assert set(events.Tags()["histograms"]) == {"gate/weight", "gate/delta"}
