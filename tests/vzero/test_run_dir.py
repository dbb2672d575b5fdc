"""An output_dir's rules, without Ray: a used directory is refused or cleared, a finished run is recognised, and a
resume rewinds the outputs (metrics, trajectories, quarantined rows) to its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vzero import run_dir
from vzero.config import ConfigError
from vzero.data.quarantine import ROW_COLUMN, QuarantineWriter


def _metrics(out: Path, steps) -> None:
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in steps))


def _checkpoint(out: Path, step: int) -> None:
    d = out / "checkpoints" / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "COMPLETE").write_text("ok\n")


def test_a_used_output_dir_is_refused_or_cleared(tmp_path) -> None:
    run_dir.prepare_fresh(tmp_path / "new", overwrite=False)  # nothing there: fine
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not a run output: never deleted
    _metrics(out, [1, 2])
    _checkpoint(out, 2)
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl, checkpoints/\): continue it with"):
        run_dir.prepare_fresh(out, overwrite=False)
    run_dir.prepare_fresh(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_finished_means_the_newest_checkpoint_reached_steps(tmp_path) -> None:
    _checkpoint(tmp_path, 3)
    assert run_dir.finished_checkpoint(tmp_path, 4) is None
    assert run_dir.finished_checkpoint(tmp_path, 3) == tmp_path / "checkpoints" / "step_000003"


def test_rewind_drops_what_steps_after_the_checkpoint_wrote(tmp_path) -> None:
    _metrics(tmp_path, [1, 2, 3, 4])
    (tmp_path / "trajectories").mkdir()
    for s in (1, 2, 3, 4):
        (tmp_path / "trajectories" / f"step_{s:06d}.parquet").write_bytes(b"x")
    schema = pa.schema([pa.field("id", pa.string())])
    with QuarantineWriter(tmp_path / "quarantine.parquet", schema, batch_size=1) as q:
        q.add({"id": "a"}, reason="bad_image", row_index=5)  # met before the checkpoint
        q.add({"id": "b"}, reason="bad_image", row_index=9)  # met in step 4: the resumed run meets it again
    run_dir.rewind_outputs(tmp_path, 2, [[5, "bad_image"]])
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "trajectories").iterdir()) == [
        "step_000001.parquet",
        "step_000002.parquet",
    ]
    assert pq.read_table(tmp_path / "quarantine.parquet").column(ROW_COLUMN).to_pylist() == [5]
