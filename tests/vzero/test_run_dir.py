"""An output_dir's rules, without Ray: a used directory is refused or cleared, a finished run is recognised, a resume
rewinds the outputs (metrics, trajectories, quarantined rows, what interrupted writes left) to its checkpoint, and a
full disk is recognised in whatever form it is raised."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.vzero.checkpoint_helpers import write_checkpoint
from vzero import run_dir
from vzero.config import ConfigError
from vzero.data.quarantine import ROW_COLUMN, QuarantineWriter


def _metrics(out: Path, steps) -> None:
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in steps))


def _checkpoint(out: Path, step: int) -> None:
    write_checkpoint(out / "checkpoints", step)


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


def test_finished_means_the_newest_loadable_checkpoint_reached_steps(tmp_path) -> None:
    _checkpoint(tmp_path, 3)
    assert run_dir.finished_checkpoint(tmp_path, 4) is None
    assert run_dir.finished_checkpoint(tmp_path, 3) == tmp_path / "checkpoints" / "step_000003"
    _checkpoint(tmp_path, 4)
    (tmp_path / "checkpoints" / "step_000004" / "optimizer.safetensors").unlink()
    assert run_dir.finished_checkpoint(tmp_path, 4) is None, "a damaged final checkpoint is trained again"


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


def test_rewind_drops_a_metrics_line_a_kill_cut_short_and_what_unfinished_writes_left(tmp_path) -> None:
    _metrics(tmp_path, [1, 2, 3])
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "loss": 0.2')
    (tmp_path / "trajectories").mkdir()
    (tmp_path / "trajectories" / "step_000003.parquet").write_bytes(b"x")
    (tmp_path / "trajectories" / "step_000004.parquet.tmp").write_bytes(b"half")
    _checkpoint(tmp_path, 3)
    (tmp_path / "checkpoints" / "step_000004.tmp-99").mkdir()
    run_dir.rewind_outputs(tmp_path, 3, [])
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [json.dumps({"step": s}) for s in (1, 2, 3)]
    assert sorted(p.name for p in (tmp_path / "trajectories").iterdir()) == ["step_000003.parquet"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000003"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    run_dir.rewind_outputs(tmp_path, 3, [])  # idempotent: a crash during the rewind is repaired by the next one
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_full_disk_is_recognised_however_it_is_raised(tmp_path) -> None:
    import errno

    from ray.exceptions import RayTaskError

    from vzero.errors import UserError

    plain = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    assert run_dir.disk_full(plain) is plain
    try:
        try:
            raise plain
        except OSError as e:
            raise RuntimeError("while writing the checkpoint") from e
    except RuntimeError as wrapped:
        assert run_dir.disk_full(wrapped) is plain
    in_actor = RayTaskError("Learner.save", "Traceback ...", plain)  # what ray.get raises for the learner's OSError
    assert run_dir.disk_full(in_actor) is plain
    text = RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: ... })")
    assert run_dir.disk_full(text) is text  # safetensors' own error type
    assert run_dir.disk_full(OSError(errno.EACCES, "Permission denied")) is None
    assert run_dir.disk_full(ValueError("bad")) is None
    err = run_dir.disk_full_error(tmp_path, plain, step=6, checkpoint=tmp_path / "checkpoints" / "step_000004")
    assert isinstance(err, UserError)
    msg = str(err)
    assert str(tmp_path / "x") in msg and "MiB free" in msg and "step_000004 is intact" in msg and "--resume" in msg
