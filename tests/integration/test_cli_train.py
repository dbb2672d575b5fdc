"""The interface the outside relies on: `vzero train --config configs/tiny-cpu.yaml steps=3 output_dir=DIR`.

Run as a user would (console script, fresh process, its own local Ray cluster, the shipped config with its default
engine), on a dataset whose `answer` column is encrypted: the run can only succeed if the training path never reads
the answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import INTERFACE_KEYS, REPO
from tests.encrypted_parquet import write_with_encrypted_answer
from vzero.checkpoint import latest_checkpoint
from vzero.metrics_log import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow]
VZERO = str(Path(sys.executable).with_name("vzero"))


def test_vzero_train_cli_on_data_with_unreadable_answers(tmp_path, synth_data, tiny_model) -> None:
    data = write_with_encrypted_answer(pq.read_table(synth_data), tmp_path / "encrypted.parquet")
    with pytest.raises(OSError, match=r"[Dd]ecrypt"):
        pq.read_table(data, columns=["answer"])
    out = tmp_path / "run"
    cmd = [
        VZERO,
        "train",
        "--config",
        str(REPO / "configs/tiny-cpu.yaml"),
        "steps=3",
        f"output_dir={out}",
        f"data.path={data}",
        "data.synth=null",
        f"student.path={tiny_model}",
        "student.build=null",
    ]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]
    summary = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith('{"output_dir"')][-1])
    assert summary == {"output_dir": str(out), "checkpoint": str(out / "checkpoints/step_000003"), "steps": 3}
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(set(m) >= INTERFACE_KEYS for m in metrics)
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints/step_000003"
    model_dir = out / "checkpoints/step_000003/model"
    assert (model_dir / "config.json").is_file() and list(model_dir.glob("*.safetensors"))
    assert (model_dir / "tokenizer.json").is_file(), "a checkpoint is a complete model dir (vLLM can serve it)"
    assert sorted(p.name for p in (out / "trajectories").iterdir()) == [f"step_{i:06d}.parquet" for i in (1, 2, 3)]
    traj = pq.read_table(out / "trajectories/step_000001.parquet")
    assert {
        "uid",
        "sample_index",
        "policy_version",
        "prompt_ids",
        "response_ids",
        "lp_old",
        "lp_pos",
        "lp_neg",
        "weight",
    } <= set(traj.column_names)
    assert list((out / "tb").glob("events.out.tfevents.*")), "TensorBoard events written"
    assert (out / "config.yaml").is_file()
    assert "answer" not in (out / "config.yaml").read_text()
