"""Append bad rows, with why and where they came from, to a Parquet quarantine file that survives crashes.

A quarantined row keeps every column it was given, plus `quarantine_reason` (a reason code from
`vzero.data.validate`) and `quarantine_row` (int64: the row's index in its source file). The writer copies whatever
columns it is handed: the training stream hands it only `TRAIN_COLUMNS`, so `answer` never passes through it there.

Crash safety. A Parquet file is unreadable until its footer is written, so one `ParquetWriter` held open for a whole
run would lose EVERY row on a hard kill (SIGKILL, OOM, preemption). Instead each flush (every `batch_size` rows) is
written as its own complete Parquet file `<path>.parts/part-NNNNNN.parquet`; `close()` merges the parts, in order,
into `path` (one row group per part, via `pq.ParquetWriter`) and removes the directory. After a crash the parts are
readable as they stand (`pq.read_table("<path>.parts")`) and `recover(path)` (or a writer opened with `mode="a"`)
merges them: a crash loses at most the rows not yet flushed (the training driver flushes at every checkpoint, so a
resumed run loses none of the rows its checkpoint knows). A merge is itself crash-safe and never doubles a row: it
writes `<path>.tmp`, marks the parts directory `MERGED`, moves the file in, then deletes the parts; whoever finds the
marker finishes that merge instead of merging the parts a second time.

Knows nothing about validation rules or prompts.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

REASON_COLUMN = "quarantine_reason"
ROW_COLUMN = "quarantine_row"
DEFAULT_BATCH_SIZE = 32  # rows per flush: small, since bad rows are rare and each flush is what a crash can't lose
MERGED_MARKER = "MERGED"  # in the parts directory: `<path>.tmp` holds every part, only the final moves are left


def parts_dir(path: str | os.PathLike[str]) -> Path:
    """Where flushed-but-not-yet-merged batches live while a writer is open (or after it crashed)."""
    p = Path(path)
    return p.with_name(p.name + ".parts")


def quarantine_schema(source: pa.Schema) -> pa.Schema:
    """`source` plus the two quarantine columns (replacing same-named columns if the source already had them)."""
    fields = [f for f in source if f.name not in (REASON_COLUMN, ROW_COLUMN)]
    return pa.schema([*fields, pa.field(REASON_COLUMN, pa.string()), pa.field(ROW_COLUMN, pa.int64())])


class QuarantineWriter:
    """Collect bad rows and flush them in small crash-safe batches; counts per reason in `counts`.

    `schema` is the schema of the rows as given (the source file's, or its projection); pass it whenever it is known,
    because inferring it from the first batch cannot type a column that happens to be all-null there. A reader can
    supply it later with `ensure_schema`. One writer holds rows of one schema. `mode="w"` starts a fresh file (an
    old `path` and leftover parts are removed); `mode="a"` keeps them and appends after them.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        schema: pa.Schema | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        mode: Literal["w", "a"] = "w",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' or 'a', got {mode!r}")
        self.path = Path(path)
        self.batch_size = batch_size
        self.counts: Counter[str] = Counter()
        self._schema = quarantine_schema(schema) if schema is not None else None
        self._buffer: list[dict[str, Any]] = []
        self._parts = parts_dir(self.path)
        self._closed = False
        if mode == "w":
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self._parts, ignore_errors=True)
        else:
            _finish_interrupted_merge(self.path)  # its parts must not be mixed with ours
        self._parts.mkdir(parents=True, exist_ok=True)
        self._next_part = len(_part_files(self._parts))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def ensure_schema(self, schema: pa.Schema) -> None:
        """Fix the row schema if none is set yet; refuse a different one (one writer = one schema)."""
        wanted = quarantine_schema(schema)
        if self._schema is None:
            self._schema = wanted
        elif not self._schema.equals(wanted, check_metadata=False):
            raise ValueError(
                f"quarantine {self.path}: rows of schema {schema.names} cannot join a file of schema "
                f"{self._schema.names}; use one QuarantineWriter per source schema"
            )

    def add(self, row: Mapping[str, Any], *, reason: str, row_index: int) -> None:
        """Queue one bad row; it is on disk once `batch_size` rows are queued (or at `flush`/`close`)."""
        if self._closed:
            raise ValueError(f"quarantine {self.path} is closed")
        self._buffer.append({**row, REASON_COLUMN: reason, ROW_COLUMN: int(row_index)})
        self.counts[reason] += 1
        if len(self._buffer) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Write the queued rows as one complete Parquet part file (atomic rename: a part is whole or absent)."""
        if not self._buffer:
            return
        if self._schema is None:
            self._schema = pa.Table.from_pylist(self._buffer).schema
        try:
            table = pa.Table.from_pylist(self._buffer, schema=self._schema)
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise ValueError(f"quarantine {self.path}: rows do not fit schema {self._schema.names}: {e}") from e
        final = self._parts / f"part-{self._next_part:06d}.parquet"
        tmp = final.with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        self._next_part += 1
        self._buffer = []

    def close(self) -> None:
        """Flush, merge all parts into `path`, remove the parts directory. Idempotent."""
        if self._closed:
            return
        self.flush()
        _merge(self.path, self._schema)
        self._closed = True

    def __enter__(self) -> QuarantineWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()  # also on error: whatever was quarantined so far is worth keeping


def recover(path: str | os.PathLike[str]) -> int:
    """Merge parts left by a crashed writer into `path` (after its existing rows); returns the rows now in `path`."""
    _merge(Path(path), None)
    return pq.ParquetFile(path).metadata.num_rows if Path(path).exists() else 0


def _part_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []


def _finish_interrupted_merge(path: Path) -> bool:
    """Complete a merge that crashed after it marked the parts as merged (True if there was one)."""
    parts = parts_dir(path)
    if not (parts / MERGED_MARKER).exists():
        return False
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():  # else it was moved in already: the parts are in `path`
        os.replace(tmp, path)
    shutil.rmtree(parts, ignore_errors=True)
    return True


def _merge(path: Path, schema: pa.Schema | None) -> None:
    """Rewrite `path` as: its old rows (if any), then every part, each part one row group; then drop the parts.

    Streams one row group / part at a time. With no rows anywhere, writes an empty file if the schema is known.
    """
    if _finish_interrupted_merge(path):
        return
    parts = _part_files(parts_dir(path))
    sources: list[pq.ParquetFile] = []
    if path.exists():
        sources.append(pq.ParquetFile(path))
    sources.extend(pq.ParquetFile(p) for p in parts)
    if schema is None and sources:
        schema = sources[0].schema_arrow
    if schema is None:
        shutil.rmtree(parts_dir(path), ignore_errors=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for source in sources:
            for i in range(source.num_row_groups):
                writer.write_table(source.read_row_group(i).cast(schema))
    if parts:  # from here on the parts are in `tmp`: a crash must not merge them again
        (parts_dir(path) / MERGED_MARKER).write_text("")
    os.replace(tmp, path)
    shutil.rmtree(parts_dir(path), ignore_errors=True)
