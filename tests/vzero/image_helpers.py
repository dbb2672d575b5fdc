"""Small real images and dataset rows for the data / views tests (built with Pillow, no fixtures files)."""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vzero.data.schema import SCHEMA


def encoded(img: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Random pixels (so crops at different places differ)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    return img if mode == "RGB" else img.convert(mode)


def png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    return encoded(noise_image(width, height, seed))


def good_row(uid: str = "r0", *, width: int = 64, height: int = 48, **overrides: Any) -> dict[str, Any]:
    """A row that validates: evidence box in the top-left quarter."""
    row: dict[str, Any] = {
        "id": uid,
        "image": png(width, height, seed=zlib.crc32(uid.encode())),
        "question": "What is in the box?",
        "evidence_box": [2.0, 2.0, 12.0, 10.0],
        "negative_box": None,
        "answer": "red",
        "source": "test",
        "pos_images": None,
        "neg_images": None,
        "teacher_prompt": None,
    }
    row.update(overrides)
    return row


def write_rows(
    path: Path, rows: Iterable[dict[str, Any]], *, row_group_size: int = 4, schema: pa.Schema = SCHEMA
) -> Path:
    """Write rows with an explicit (possibly non-standard) schema, several row groups."""
    table = pa.Table.from_pylist(list(rows), schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def loose_schema() -> pa.Schema:
    """Our schema with every field nullable, so tests can write rows with missing required fields."""
    return pa.schema([f.with_nullable(True) for f in SCHEMA])
