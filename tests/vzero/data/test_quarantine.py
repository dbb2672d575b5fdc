"""vzero.data.quarantine: rows + reason + source row index, per-reason counts, one row group per flush, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vzero.data.quarantine import QuarantineWriter, parts_dir, recover

REPO = Path(__file__).resolve().parents[3]
SCHEMA = pa.schema([("id", pa.string()), ("box", pa.list_(pa.float64())), ("answer", pa.string())])


def test_rows_reason_index_and_counts(tmp_path):
    path = tmp_path / "q.parquet"
    with QuarantineWriter(path, SCHEMA, batch_size=2) as q:
        q.add({"id": "a", "box": [1.0], "answer": "x"}, reason="box_wrong_length:box", row_index=4)
        q.add({"id": "b", "box": None, "answer": None}, reason="missing_field:box", row_index=9)
        q.add({"id": "c", "box": [1.0, 2.0], "answer": "z"}, reason="box_wrong_length:box", row_index=11)
    assert q.counts == {"box_wrong_length:box": 2, "missing_field:box": 1} and q.total == 3
    table = pq.read_table(path)
    assert table.column_names == ["id", "box", "answer", "quarantine_reason", "quarantine_row"]
    assert table.schema.field("quarantine_row").type == pa.int64()
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    assert table.column("quarantine_row").to_pylist() == [4, 9, 11]
    assert table.column("box").to_pylist() == [[1.0], None, [1.0, 2.0]]
    assert pq.ParquetFile(path).num_row_groups == 2  # one per flush: [a, b], [c]
    assert not parts_dir(path).exists()


def test_columns_missing_from_a_row_are_null(tmp_path):
    path = tmp_path / "q.parquet"
    with QuarantineWriter(path, SCHEMA) as q:
        q.add({"id": "a"}, reason="r", row_index=0)
    assert pq.read_table(path).to_pylist()[0]["box"] is None


def test_no_rows_with_schema_gives_empty_file(tmp_path):
    path = tmp_path / "q.parquet"
    QuarantineWriter(path, SCHEMA).close()
    assert pq.read_table(path).num_rows == 0


def test_mode_w_replaces_mode_a_appends(tmp_path):
    path = tmp_path / "q.parquet"
    with QuarantineWriter(path, SCHEMA) as q:
        q.add({"id": "a"}, reason="r", row_index=0)
    with QuarantineWriter(path, SCHEMA, mode="a") as q:
        q.add({"id": "b"}, reason="r", row_index=1)
    assert pq.read_table(path).column("id").to_pylist() == ["a", "b"]
    with QuarantineWriter(path, SCHEMA) as q:
        q.add({"id": "c"}, reason="r", row_index=2)
    assert pq.read_table(path).column("id").to_pylist() == ["c"]


def test_ensure_schema_refuses_a_second_schema(tmp_path):
    q = QuarantineWriter(tmp_path / "q.parquet", SCHEMA)
    q.ensure_schema(SCHEMA)  # same: fine
    with pytest.raises(ValueError, match="one QuarantineWriter per source schema"):
        q.ensure_schema(pa.schema([("id", pa.string())]))


def test_schema_inferred_when_not_given(tmp_path):
    path = tmp_path / "q.parquet"
    with QuarantineWriter(path) as q:
        q.add({"id": "a", "n": 1}, reason="r", row_index=0)
    assert pq.read_table(path).to_pylist() == [{"id": "a", "n": 1, "quarantine_reason": "r", "quarantine_row": 0}]


def test_hard_kill_loses_only_the_unflushed_batch(tmp_path):
    """SIGKILL after 2 flushes + 1 pending row: the 4 flushed rows survive and `recover` merges them."""
    path = tmp_path / "q.parquet"
    script = textwrap.dedent(
        f"""
        import os, signal
        import pyarrow as pa
        from vzero.data.quarantine import QuarantineWriter
        q = QuarantineWriter({str(path)!r}, pa.schema([("id", pa.string())]), batch_size=2)
        for i in range(5):
            q.add({{"id": f"r{{i}}"}}, reason="r", row_index=i)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL
    assert not path.exists()
    assert pq.read_table(parts_dir(path)).column("id").to_pylist() == ["r0", "r1", "r2", "r3"]  # readable as is
    assert recover(path) == 4
    assert pq.read_table(path).column("id").to_pylist() == ["r0", "r1", "r2", "r3"]
    assert not parts_dir(path).exists()


def test_rows_that_do_not_fit_the_schema_raise_with_names(tmp_path):
    q = QuarantineWriter(tmp_path / "q.parquet", SCHEMA, batch_size=1)
    with pytest.raises(ValueError, match=r"rows do not fit schema \['id', 'box'"):
        q.add({"id": "a", "box": "not a list"}, reason="r", row_index=0)


@pytest.mark.parametrize("crash_at", ["before the merged file moves in", "after it moved in, parts not yet deleted"])
def test_a_merge_a_crash_interrupts_is_finished_later_and_never_doubles_a_row(tmp_path, monkeypatch, crash_at):
    import vzero.data.quarantine as quarantine

    path = tmp_path / "q.parquet"
    q = QuarantineWriter(path, pa.schema([("id", pa.string())]), batch_size=1)
    for i in range(3):
        q.add({"id": f"r{i}"}, reason="r", row_index=i)

    def crash(*args, **kwargs):
        raise OSError("killed here")

    if crash_at.startswith("before"):
        real = os.replace
        monkeypatch.setattr(os, "replace", lambda a, b: crash() if Path(b) == path else real(a, b))
    else:
        monkeypatch.setattr(quarantine.shutil, "rmtree", crash)
    with pytest.raises(OSError, match="killed here"):
        q.close()
    monkeypatch.undo()
    assert parts_dir(path).is_dir(), "the crash left the parts behind"
    again = QuarantineWriter(path, mode="a", batch_size=1)  # a resumed run appends after the finished merge
    again.add({"id": "r3"}, reason="r", row_index=3)
    again.close()
    assert pq.read_table(path).column("id").to_pylist() == ["r0", "r1", "r2", "r3"]
    assert recover(path) == 4 and not parts_dir(path).exists()
