"""Turn one raw Parquet row into a `Prompt`, or into a stable reason code saying why it cannot be one.

Reason codes (the only place they are defined; quarantine files and `vzero data check` report them verbatim):

| code                              | meaning                                                                   |
|-----------------------------------|---------------------------------------------------------------------------|
| `missing_field:<f>`               | required field `<f>` absent or null                                       |
| `wrong_type:<f>`                  | field `<f>` has the wrong Python type (e.g. id not a string)              |
| `id_empty`                        | `id` is an empty / whitespace-only string                                 |
| `question_empty`                  | `question` is empty or whitespace only                                    |
| `box_wrong_length:<f>`            | box `<f>` does not have exactly 4 numbers                                 |
| `box_not_finite:<f>`              | box `<f>` has a NaN / inf coordinate                                      |
| `box_empty:<f>`                   | box `<f>` has zero or negative area (x1 <= x0 or y1 <= y0)                |
| `teacher_prompt_no_crop`          | `teacher_prompt` holds no `<crop>` marker (the teacher would see no crop) |
| `teacher_prompt_images`           | `teacher_prompt` holds more than one `<image>` (a row has one full image) |
| `crop_count:pos_images`           | `pos_images` does not hold one crop per `<crop>` of `teacher_prompt` (one |
|                                   | without a template); empty = the box's crop, so only for one `<crop>`     |
| `crop_count:neg_images`           | `neg_images` is neither empty nor one negative per crop                   |
| `box_outside_image:<f>`           | a coordinate of box `<f>` lies outside [0, W] x [0, H]                    |
| `negative_box_overlaps_evidence`  | the negative box intersects the evidence box with positive area          |
| `image_undecodable`               | image bytes unreadable, corrupt or truncated (full decode forced)         |
| `image_unsupported_format`        | decodable but not PNG / JPEG / WebP (e.g. BMP, GIF, TIFF)                 |
| `image_too_large`                 | width * height > max_pixels (checked from the header, before decoding)    |
| `image_*:pos_images`, `…:neg_images`| the same three image checks for each precomputed crop                  |
| `duplicate_id`                    | id already seen in this file (decided by the caller, see `check_duplicate`)|

Checks run in the order of that table (cheap field checks first, pixel decoding last); the first failure is reported.
Accepted images in modes other than RGB (L, LA, P, RGBA, CMYK, 16-bit, ...) are converted to RGB and carried as
re-encoded PNG bytes; RGB images keep their original bytes. The `answer` field is never looked at.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from vzero.data import schema as S
from vzero.images import SUPPORTED_FORMATS, decode_rgb, encode_png, probe
from vzero.records import Box, Prompt
from vzero.teacher_prompt import count_markers

DEFAULT_MAX_PIXELS = 40_000_000  # ~6300 x 6300: above any benchmark image we target, far below RAM trouble

DUPLICATE_ID = "duplicate_id"
ID_EMPTY = "id_empty"
QUESTION_EMPTY = "question_empty"
NEGATIVE_OVERLAPS = "negative_box_overlaps_evidence"
IMAGE_UNDECODABLE = "image_undecodable"
IMAGE_UNSUPPORTED = "image_unsupported_format"
IMAGE_TOO_LARGE = "image_too_large"
TEACHER_PROMPT_NO_CROP = "teacher_prompt_no_crop"
TEACHER_PROMPT_IMAGES = "teacher_prompt_images"


def crop_count(field: str) -> str:
    return f"crop_count:{field}"


def missing_field(field: str) -> str:
    return f"missing_field:{field}"


def wrong_type(field: str) -> str:
    return f"wrong_type:{field}"


class RowError(Exception):
    """Internal: carries the reason code of the first failed check."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def validate_row(row: Mapping[str, Any], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Prompt | None, str | None]:
    """Return `(Prompt, None)` for a usable row, `(None, reason_code)` otherwise (codes: module docstring).

    Never raises on bad data; duplicates are not detected here (one row has no memory of others: see
    `check_duplicate`).
    """
    try:
        return _validate(row, max_pixels), None
    except RowError as e:
        return None, e.reason


def check_duplicate(uid: str, seen: set[str]) -> str | None:
    """`duplicate_id` if `uid` is already in `seen`, else record it and return None (first occurrence wins)."""
    if uid in seen:
        return DUPLICATE_ID
    seen.add(uid)
    return None


def _validate(row: Mapping[str, Any], max_pixels: int) -> Prompt:
    uid = _required_str(row, S.ID)
    if not uid.strip():
        raise RowError(ID_EMPTY)
    question = _required_str(row, S.QUESTION)
    if not question.strip():
        raise RowError(QUESTION_EMPTY)
    evidence = _box(row, S.EVIDENCE_BOX, required=True)
    assert evidence is not None  # required=True never returns None
    negative = _box(row, S.NEGATIVE_BOX, required=False)
    source = row.get(S.SOURCE)
    if source is not None and not isinstance(source, str):
        raise RowError(wrong_type(S.SOURCE))
    template = row.get(S.TEACHER_PROMPT)
    if template is not None and not isinstance(template, str):
        raise RowError(wrong_type(S.TEACHER_PROMPT))
    crops = {field: _bytes_list(row, field) for field in (S.POS_IMAGES, S.NEG_IMAGES)}
    _check_crop_counts(template, len(crops[S.POS_IMAGES]), len(crops[S.NEG_IMAGES]))

    image = _bytes(row, S.IMAGE, required=True)
    assert image is not None
    width, height = _check_header(image, max_pixels, suffix="")
    for field, box in ((S.EVIDENCE_BOX, evidence), (S.NEGATIVE_BOX, negative)):
        if box is not None and not (
            0 <= box[0] <= width and 0 <= box[2] <= width and 0 <= box[1] <= height and 0 <= box[3] <= height
        ):
            raise RowError(f"box_outside_image:{field}")
    if negative is not None and boxes_overlap(evidence, negative):
        raise RowError(NEGATIVE_OVERLAPS)
    image = _decoded_rgb_bytes(image, suffix="")

    for field, items in crops.items():
        for data in items:
            _check_header(data, max_pixels, suffix=f":{field}")
        crops[field] = [_decoded_rgb_bytes(data, suffix=f":{field}") for data in items]

    return Prompt(
        uid=uid,
        image=image,
        question=question,
        evidence_box=evidence,
        negative_box=negative,
        pos_images=tuple(crops[S.POS_IMAGES]),
        neg_images=tuple(crops[S.NEG_IMAGES]),
        teacher_prompt=template,
        source=source,
    )


def boxes_overlap(a: Box, b: Box) -> bool:
    """True when the boxes share positive area (touching edges do not count)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _required_str(row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        raise RowError(missing_field(field))
    if not isinstance(value, str):
        raise RowError(wrong_type(field))
    return value


def _bytes(row: Mapping[str, Any], field: str, *, required: bool) -> bytes | None:
    value = row.get(field)
    if value is None:
        if required:
            raise RowError(missing_field(field))
        return None
    if not isinstance(value, bytes | bytearray | memoryview):
        raise RowError(wrong_type(field))
    return bytes(value)


def _bytes_list(row: Mapping[str, Any], field: str) -> list[bytes]:
    """A list<binary> field as a list of bytes ([] for null or empty)."""
    value = row.get(field)
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list | tuple) or not all(isinstance(v, bytes | bytearray | memoryview) for v in value):
        raise RowError(wrong_type(field))
    return [bytes(v) for v in value]


def _check_crop_counts(template: str | None, num_pos: int, num_neg: int) -> None:
    """One crop per `<crop>` of the row's template (one without a template); negatives: none or one per crop."""
    crops = 1
    if template is not None:
        images, crops = count_markers(template)
        if crops == 0:
            raise RowError(TEACHER_PROMPT_NO_CROP)
        if images > 1:
            raise RowError(TEACHER_PROMPT_IMAGES)
    if num_pos not in (0, crops) or (num_pos == 0 and crops != 1):  # no crops: the box's crop, which is one
        raise RowError(crop_count(S.POS_IMAGES))
    if num_neg not in (0, crops):
        raise RowError(crop_count(S.NEG_IMAGES))


def _box(row: Mapping[str, Any], field: str, *, required: bool) -> Box | None:
    value = row.get(field)
    if value is None:
        if required:
            raise RowError(missing_field(field))
        return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise RowError(wrong_type(field))
    # bool is an int subclass; a box of True/False is a type error, not a 1-pixel box
    if any(v is None or isinstance(v, bool) or not isinstance(v, int | float) for v in value):
        raise RowError(wrong_type(field))
    if len(value) != 4:
        raise RowError(f"box_wrong_length:{field}")
    coords = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in coords):
        raise RowError(f"box_not_finite:{field}")
    x0, y0, x1, y1 = coords
    if x1 <= x0 or y1 <= y0:
        raise RowError(f"box_empty:{field}")
    return (x0, y0, x1, y1)


def _check_header(data: bytes, max_pixels: int, *, suffix: str) -> tuple[int, int]:
    """Format and size from the header; refuses oversized images before any pixel is decoded."""
    try:
        header = probe(data)
    except Image.DecompressionBombError as e:  # Pillow's own guard fires above 2x its MAX_IMAGE_PIXELS
        raise RowError(IMAGE_TOO_LARGE + suffix) from e
    except Exception as e:  # Pillow raises many types on garbage (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise RowError(IMAGE_UNDECODABLE + suffix) from e
    if header.format not in SUPPORTED_FORMATS:
        raise RowError(IMAGE_UNSUPPORTED + suffix)
    if header.width * header.height > max_pixels:
        raise RowError(IMAGE_TOO_LARGE + suffix)
    return header.width, header.height


def _decoded_rgb_bytes(data: bytes, *, suffix: str) -> bytes:
    """Force a full decode; keep RGB bytes as they are, re-encode anything else as RGB PNG."""
    try:
        header = probe(data)
        img = decode_rgb(data)
    except Image.DecompressionBombError as e:
        raise RowError(IMAGE_TOO_LARGE + suffix) from e
    except Exception as e:
        raise RowError(IMAGE_UNDECODABLE + suffix) from e
    return data if header.mode == "RGB" else encode_png(img)
