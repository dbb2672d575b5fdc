"""The Parquet layout of a V-Zero dataset: column names, the schema we write, and opening/writing files.

One row = one training prompt:

| column           | type          | required | meaning                                                            |
|------------------|---------------|----------|--------------------------------------------------------------------|
| `id`             | string        | yes      | unique row id; becomes `Prompt.uid` (the trajectory group id)      |
| `image`          | binary        | yes      | encoded PNG / JPEG / WebP full image (the student's view)          |
| `question`       | string        | yes      | the question about the image                                       |
| `evidence_box`   | list<double>  | yes      | x0, y0, x1, y1 in image pixels: the question-relevant region       |
| `negative_box`   | list<double>  | no       | a user-chosen irrelevant region of the same size                   |
| `answer`         | string        | no       | EVALUATION ONLY: the training path never reads it                  |
| `source`         | string        | no       | dataset / task family                                              |
| `pos_images`     | list<binary>  | no       | precomputed evidence crops, in `<crop>` order (imported datasets)  |
| `neg_images`     | list<binary>  | no       | precomputed negatives, one per crop (imported datasets)            |
| `teacher_prompt` | string        | no       | the teacher's user turn: `<image>` = the full image, `<crop>` = the |
|                  |               |          | next crop (vzero.teacher_prompt); unset = `teacher.prompt_template` |

`TRAIN_COLUMNS` is everything but `answer`; readers on the training path project onto it, so the `answer` column chunks
are never fetched or decoded. Knows nothing about images or validation rules beyond the column list.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ID = "id"
IMAGE = "image"
QUESTION = "question"
EVIDENCE_BOX = "evidence_box"
NEGATIVE_BOX = "negative_box"
ANSWER = "answer"
SOURCE = "source"
POS_IMAGES = "pos_images"
NEG_IMAGES = "neg_images"
TEACHER_PROMPT = "teacher_prompt"
RENAMED = {"pos_image": POS_IMAGES, "neg_image": NEG_IMAGES}  # single-view columns before #12 (lists since)

SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(IMAGE, pa.binary(), nullable=False),
        pa.field(QUESTION, pa.string(), nullable=False),
        pa.field(EVIDENCE_BOX, pa.list_(pa.float64()), nullable=False),
        pa.field(NEGATIVE_BOX, pa.list_(pa.float64())),
        pa.field(ANSWER, pa.string()),
        pa.field(SOURCE, pa.string()),
        pa.field(POS_IMAGES, pa.list_(pa.binary())),
        pa.field(NEG_IMAGES, pa.list_(pa.binary())),
        pa.field(TEACHER_PROMPT, pa.string()),
    ]
)
ALL_COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
REQUIRED_COLUMNS: tuple[str, ...] = (ID, IMAGE, QUESTION, EVIDENCE_BOX)
TRAIN_COLUMNS: tuple[str, ...] = tuple(c for c in ALL_COLUMNS if c != ANSWER)

DEFAULT_ROW_GROUP_SIZE = 128  # rows; ~10-20 MB of images per group at 336-1000 px, the unit the stream reads and caches


class DataFileError(ValueError):
    """The file itself is unusable (unreadable, not Parquet, a required column missing), as opposed to a bad row."""


def open_dataset(path: str | os.PathLike[str], **kwargs: Any) -> pq.ParquetFile:
    """Open a dataset file and check that every required column exists; `kwargs` go to `pq.ParquetFile`.

    Raises `DataFileError` naming the path and the problem, with the original exception chained; also for the
    single-view columns of older imports (`pos_image`, `neg_image`), which the reader would otherwise not see.
    """
    try:
        pf = pq.ParquetFile(path, **kwargs)
    except (OSError, pa.ArrowException) as e:
        raise DataFileError(f"{path}: cannot read as Parquet ({e})") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise DataFileError(
            f"{path}: required column(s) {missing} missing "
            f"(file has {pf.schema_arrow.names}; required {list(REQUIRED_COLUMNS)})"
        )
    old = {c: new for c, new in RENAMED.items() if c in pf.schema_arrow.names}
    if old:
        raise DataFileError(
            f"{path}: column(s) {sorted(old)} were replaced by {sorted(old.values())} (lists: a row may hold several "
            "crops); re-run `vzero data import-vzero` on the source files"
        )
    return pf


def train_columns_in(schema: pa.Schema) -> list[str]:
    """The training-path columns present in `schema`, in schema order (never `answer`)."""
    return [name for name in schema.names if name in TRAIN_COLUMNS]


class DatasetWriter:
    """Write rows in our `SCHEMA`, one row group per `row_group_size` rows, atomically.

    Rows go to `<path>.tmp` and are renamed onto `path` only by a clean `close()`, so a crashed writer never leaves a
    half-written dataset that looks complete; on an exception inside `with`, the temporary file is removed.
    Columns missing from a row are written as null.
    """

    def __init__(self, path: str | os.PathLike[str], *, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> None:
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
        self.path = Path(path)
        self.row_group_size = row_group_size
        self.rows_written = 0
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._buffer: list[Mapping[str, Any]] = []
        self._writer = pq.ParquetWriter(self._tmp, SCHEMA)

    def write(self, row: Mapping[str, Any]) -> None:
        unknown = set(row) - set(ALL_COLUMNS)
        if unknown:
            raise ValueError(
                f"row {row.get(ID)!r}: unknown column(s) {sorted(unknown)}; schema has {list(ALL_COLUMNS)}"
            )
        self._buffer.append(row)
        if len(self._buffer) >= self.row_group_size:
            self._flush()

    def write_all(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.write(row)

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=SCHEMA))
            self.rows_written += len(self._buffer)
            self._buffer = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop everything: close the temporary file and remove it."""
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
