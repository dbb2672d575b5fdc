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


def _scalars_by_every_reader(tb) -> tuple[dict, dict]:
    """loss per step as TensorBoard's EventAccumulator shows it, and as a plain reader of every events file sees it
    (step -> list of values: a step written twice shows twice)."""
    from vzero.metrics_log import events_files, read_events

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    shown = {s.step: s.value for s in acc.Scalars("loss")}
    raw: dict[int, list[float]] = {}
    for path in events_files(tb):
        for event in read_events(path):
            for v in event.summary.value:
                if v.tag == "loss":
                    raw.setdefault(event.step, []).append(v.simple_value)
    return shown, raw


def test_a_resumed_run_leaves_one_value_per_step_for_every_tensorboard_reader(tmp_path) -> None:
    """Run 1 logs steps 1-5 and is killed (its last record cut in half); the resume from checkpoint 3 rewinds and
    logs 4-6 again with other values: every reader sees steps 1-6 once, 4-6 with the resumed run's values."""
    from vzero.metrics_log import events_files, rewind_metrics, rewind_tensorboard

    first = MetricsLog(tmp_path, tensorboard=True)
    for step in range(1, 6):
        first.log(step, {"loss": float(step)}, [_traj(0, [-1.0], [-2.0], 1.0)])
    first._tb.flush()  # what a kill leaves: everything flushed so far (the log flushes every step)
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 6, "lo')  # a line the kill cut short
    [events] = events_files(tmp_path / "tb")
    with events.open("ab") as fh:
        fh.write(b"\x20\x00\x00\x00\x00\x00")  # and half a record header
    _, raw = _scalars_by_every_reader(tmp_path / "tb")
    assert sorted(raw) == [1, 2, 3, 4, 5]

    assert rewind_metrics(tmp_path / "metrics.jsonl", 3) == 3  # steps 4, 5 and the broken line
    assert rewind_tensorboard(tmp_path / "tb", 3) > 0
    assert rewind_tensorboard(tmp_path / "tb", 3) == 0, "a second rewind (a crash right after) changes nothing"
    resumed = MetricsLog(tmp_path, tensorboard=True)
    for step in range(4, 7):
        resumed.log(step, {"loss": 10.0 * step}, [_traj(0, [-1.0], [-2.0], 1.0)])
    resumed.close()

    shown, raw = _scalars_by_every_reader(tmp_path / "tb")
    want = {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0, 6: 60.0}
    assert shown == want
    assert raw == {step: [value] for step, value in want.items()}
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    assert [h.step for h in acc.Histograms("gate/weight")] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(want.values())
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6

    rewind_tensorboard(tmp_path / "tb", 6)  # two files (rewound + resumed) become one, nothing lost
    assert len(events_files(tmp_path / "tb")) == 1
    assert _scalars_by_every_reader(tmp_path / "tb")[1] == {step: [value] for step, value in want.items()}
