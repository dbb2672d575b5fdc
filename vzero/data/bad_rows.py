"""A dataset with bad rows of every kind the data checks can meet in a Parquet file, at known rows: the ground truth
for the quarantine tests at scale and `bench/data_stream.py`.

`write_bad_rows_file(path, n, bad_fraction=0.05)` writes `n` rows in our schema (every field nullable, so required
fields can be null) and returns `{row index: reason code}` for the bad ones, decided here by construction and never
by running the validator: a test compares what `vzero data check`, the stream and a training run's quarantine say
with this plan. `clean=True` writes the same file with every bad row replaced by a good one (the benchmark's
baseline). The kinds (`KINDS`) are the codes of vzero/data/validate.py that a well-typed Parquet column can hold: a
string column cannot hold a number, so `wrong_type` appears only as a box with a null coordinate. Each bad row keeps
a unique id (whitespace-only ids differ in length), so the only `duplicate_id` rows are the ones meant: a copy of an
earlier good row's id on an otherwise good row, which `data check` (duplicates among valid rows) and the stream (the
first occurrence in file order wins) both count.

Images are small smooth PNGs (64 px, a few hundred bytes), so 10,000 rows take a few MB and seconds to write.
Deterministic for the same arguments. Knows nothing about the stream or training.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vzero.data import schema as S
from vzero.images import encode_png

LOOSE_SCHEMA = pa.schema([f.with_nullable(True) for f in S.SCHEMA])
_SIDE = 64


def _image(rng: np.random.Generator, side: int = _SIDE) -> Image.Image:
    """A smooth gradient with one square: compresses to a few hundred bytes, still a real image."""
    y, x = np.mgrid[0:side, 0:side]
    base = rng.integers(0, 200, size=3)
    arr = np.stack([(base[c] + (x + y) * (c + 1) // 4) % 256 for c in range(3)], axis=-1).astype(np.uint8)
    sq = max(2, side // 5)
    x0, y0 = (int(v) for v in rng.integers(1, side - sq, size=2))
    arr[y0 : y0 + sq, x0 : x0 + sq] = rng.integers(0, 256, size=3)
    return Image.fromarray(arr)


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no valid pixel data): refused from the header, never decoded."""
    data = bytearray(encode_png(Image.new("L", (1, 1))))
    ihdr = 16  # 8 signature bytes, then IHDR's length (4) and type (4): width and height follow
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))  # the chunk type and its 13 data bytes
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def _crop(rng: np.random.Generator) -> bytes:
    return encode_png(_image(rng, 16))


def _bmp(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    _image(rng, 16).save(buf, format="BMP")
    return buf.getvalue()


_HUGE_SIDE = 8000  # 64 M pixels: above DEFAULT_MAX_PIXELS (40 M), refused from the header
_TOO_LARGE = _huge_png_header(_HUGE_SIDE, _HUGE_SIDE)
_GARBAGE = b"\x89PNG but not really an image"


def _set(**fields: Any) -> Callable[[dict[str, Any], np.random.Generator, int], None]:
    return lambda row, rng, k: row.update(fields)


# reason code -> how to spoil a good row (row, rng, k-th row of this kind); rows' evidence box is inside the image
KINDS: dict[str, Callable[[dict[str, Any], np.random.Generator, int], None]] = {
    "missing_field:id": _set(id=None),
    "missing_field:image": _set(image=None),
    "missing_field:question": _set(question=None),
    "missing_field:evidence_box": _set(evidence_box=None),
    "wrong_type:evidence_box": _set(evidence_box=[1.0, None, 20.0, 20.0]),
    "wrong_type:negative_box": _set(negative_box=[40.0, None, 50.0, 50.0]),
    "id_empty": lambda row, rng, k: row.update(id=" " * (k + 1)),
    "question_empty": _set(question=" \n\t "),
    "box_wrong_length:evidence_box": _set(evidence_box=[1.0, 1.0, 20.0]),
    "box_wrong_length:negative_box": _set(negative_box=[40.0, 40.0, 50.0, 50.0, 1.0]),
    "box_not_finite:evidence_box": _set(evidence_box=[1.0, 1.0, math.nan, 20.0]),
    "box_not_finite:negative_box": _set(negative_box=[40.0, 40.0, math.inf, 50.0]),
    "box_empty:evidence_box": _set(evidence_box=[20.0, 1.0, 20.0, 20.0]),
    "box_empty:negative_box": _set(negative_box=[50.0, 50.0, 40.0, 60.0]),
    "box_outside_image:evidence_box": _set(evidence_box=[1.0, 1.0, 20.0, _SIDE + 1.0]),
    "box_outside_image:negative_box": _set(negative_box=[-5.0, 40.0, 10.0, 50.0]),
    "negative_box_overlaps_evidence": _set(negative_box=[10.0, 10.0, 30.0, 30.0]),
    "image_undecodable": _set(image=_GARBAGE),
    "image_unsupported_format": lambda row, rng, k: row.update(image=_bmp(rng)),
    "image_too_large": _set(image=_TOO_LARGE),
    # precomputed crops (lists; no template means one crop, so one item fits and two do not)
    "teacher_prompt_no_crop": _set(teacher_prompt="Look at <image>: what is in the box?"),
    "teacher_prompt_images": _set(teacher_prompt="<image> and <image>, then <crop>"),
    "crop_count:pos_images": lambda row, rng, k: row.update(pos_images=[_crop(rng), _crop(rng)]),
    "crop_count:neg_images": lambda row, rng, k: row.update(neg_images=[_crop(rng), _crop(rng)]),
    "image_undecodable:pos_images": _set(pos_images=[_GARBAGE]),
    "image_unsupported_format:pos_images": lambda row, rng, k: row.update(pos_images=[_bmp(rng)]),
    "image_too_large:pos_images": _set(pos_images=[_TOO_LARGE]),
    "image_undecodable:neg_images": _set(neg_images=[_GARBAGE]),
    "image_unsupported_format:neg_images": lambda row, rng, k: row.update(neg_images=[_bmp(rng)]),
    "image_too_large:neg_images": _set(neg_images=[_TOO_LARGE]),
    "duplicate_id": lambda row, rng, k: None,  # the id is set by `write_bad_rows_file` (an earlier good row's)
}


def good_row(index: int, seed: int) -> dict[str, Any]:
    """Row `index`: a valid prompt (evidence box [1, 1, 20, 20] on a 64 px image, a negative box on some rows)."""
    rng = np.random.default_rng([seed, index])
    return {
        S.ID: f"row-{seed}-{index:06d}",
        S.IMAGE: encode_png(_image(rng)),
        S.QUESTION: "What colour is the small square?",
        S.EVIDENCE_BOX: [1.0, 1.0, 20.0, 20.0],
        S.NEGATIVE_BOX: [40.0, 40.0, 59.0, 59.0] if index % 2 else None,
        S.ANSWER: "red",
        S.SOURCE: "bad-rows",
    }


def plan(n: int, *, bad_fraction: float, seed: int) -> dict[int, str]:
    """Which rows are bad and how: `round(n * bad_fraction)` rows at random places, the kinds in turn (so each kind
    gets about the same count). Row 0 stays good (a `duplicate_id` copies the id of an earlier good row)."""
    if not 0 <= bad_fraction < 1:
        raise ValueError(f"bad_fraction must be in [0, 1), got {bad_fraction}")
    rng = np.random.default_rng([seed, 7])
    rows = sorted(int(r) for r in rng.choice(np.arange(1, n), size=round(n * bad_fraction), replace=False))
    kinds = list(KINDS)
    return {row: kinds[i % len(kinds)] for i, row in enumerate(rows)}


def write_bad_rows_file(
    path: str | os.PathLike[str],
    n: int,
    *,
    bad_fraction: float = 0.05,
    seed: int = 0,
    clean: bool = False,
    row_group_size: int = S.DEFAULT_ROW_GROUP_SIZE,
) -> dict[int, str]:
    """Write the file (see the module docstring); returns {row: reason} of its bad rows ({} when `clean`)."""
    bad = plan(n, bad_fraction=bad_fraction, seed=seed)
    seen: dict[str, int] = {}
    good_ids: list[str] = []
    writer = pq.ParquetWriter(path, LOOSE_SCHEMA)
    try:
        for start in range(0, n, row_group_size):
            rows = []
            for index in range(start, min(n, start + row_group_size)):
                row = good_row(index, seed)
                reason = None if clean else bad.get(index)
                if reason is not None:
                    k = seen[reason] = seen.get(reason, -1) + 1
                    KINDS[reason](row, np.random.default_rng([seed, index, 1]), k)
                    if reason == "duplicate_id":
                        row[S.ID] = good_ids[(k * 7919) % len(good_ids)]
                else:
                    good_ids.append(row[S.ID])
                rows.append(row)
            writer.write_table(pa.Table.from_pylist(rows, schema=LOOSE_SCHEMA))
    finally:
        writer.close()
    return {} if clean else bad
