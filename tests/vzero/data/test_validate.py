"""vzero.data.validate: every reason code on a real bad row, mode conversion, and what stays untouched."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from tests.vzero.image_helpers import encoded, good_row, noise_image, png
from vzero.data.validate import check_duplicate, validate_row
from vzero.images import decode_rgb


def reason_of(row, **kw):
    prompt, reason = validate_row(row, **kw)
    assert (prompt is None) == (reason is not None)
    return reason


def test_good_rgb_row_keeps_original_bytes_and_fields():
    row = good_row("a", negative_box=[40.0, 30.0, 50.0, 38.0])
    prompt, reason = validate_row(row)
    assert reason is None
    assert prompt.uid == "a"
    assert prompt.image == row["image"]
    assert prompt.evidence_box == (2.0, 2.0, 12.0, 10.0)
    assert prompt.negative_box == (40.0, 30.0, 50.0, 38.0)
    assert prompt.source == "test" and prompt.pos_images == () and prompt.teacher_prompt is None


def test_answer_is_not_needed():
    row = good_row()
    del row["answer"]
    assert reason_of(row) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": None}, "missing_field:id"),
        ({"id": 7}, "wrong_type:id"),
        ({"id": "  "}, "id_empty"),
        ({"question": None}, "missing_field:question"),
        ({"question": b"x"}, "wrong_type:question"),
        ({"question": " \n\t"}, "question_empty"),
        ({"evidence_box": None}, "missing_field:evidence_box"),
        ({"evidence_box": "0,0,1,1"}, "wrong_type:evidence_box"),
        ({"evidence_box": [0.0, 0.0, None, 1.0]}, "wrong_type:evidence_box"),
        ({"evidence_box": [True, 0, 1, 1]}, "wrong_type:evidence_box"),
        ({"evidence_box": [0.0, 0.0, 5.0]}, "box_wrong_length:evidence_box"),
        ({"evidence_box": [0.0, 0.0, math.nan, 5.0]}, "box_not_finite:evidence_box"),
        ({"evidence_box": [0.0, 0.0, math.inf, 5.0]}, "box_not_finite:evidence_box"),
        ({"evidence_box": [5.0, 0.0, 5.0, 5.0]}, "box_empty:evidence_box"),
        ({"evidence_box": [0.0, 6.0, 5.0, 1.0]}, "box_empty:evidence_box"),
        ({"evidence_box": [0.0, 0.0, 64.5, 5.0]}, "box_outside_image:evidence_box"),
        ({"evidence_box": [-1.0, 0.0, 5.0, 5.0]}, "box_outside_image:evidence_box"),
        ({"evidence_box": [0.0, 0.0, 5.0, 49.0]}, "box_outside_image:evidence_box"),
        ({"negative_box": [1.0, 2.0, 3.0]}, "box_wrong_length:negative_box"),
        ({"negative_box": [60.0, 0.0, 70.0, 5.0]}, "box_outside_image:negative_box"),
        ({"negative_box": [10.0, 8.0, 20.0, 18.0]}, "negative_box_overlaps_evidence"),
        ({"source": 3}, "wrong_type:source"),
        ({"image": None}, "missing_field:image"),
        ({"image": "not bytes"}, "wrong_type:image"),
        ({"image": b"definitely not an image"}, "image_undecodable"),
        ({"image": b""}, "image_undecodable"),
        ({"pos_images": [b"garbage"]}, "image_undecodable:pos_images"),
        ({"pos_images": b"not a list"}, "wrong_type:pos_images"),
        ({"neg_images": [5]}, "wrong_type:neg_images"),
        ({"teacher_prompt": 5}, "wrong_type:teacher_prompt"),
        ({"teacher_prompt": "<image> no crop"}, "teacher_prompt_no_crop"),
        ({"teacher_prompt": "<image><image><crop>"}, "teacher_prompt_images"),
        ({"pos_images": [png(8, 8), png(8, 8)]}, "crop_count:pos_images"),  # two crops, the default template: one
        ({"teacher_prompt": "<crop><crop>q"}, "crop_count:pos_images"),  # two markers, only the box's crop
        ({"teacher_prompt": "<crop><crop>q", "pos_images": [png(8, 8)]}, "crop_count:pos_images"),
        ({"neg_images": [png(8, 8), png(8, 8)]}, "crop_count:neg_images"),
    ],
)
def test_bad_field_gives_its_reason(change, reason):
    row = good_row()
    row.update(change)
    assert reason_of(row) == reason


def test_missing_key_equals_null():
    row = good_row()
    del row["question"]
    assert reason_of(row) == "missing_field:question"


def test_negative_box_touching_evidence_is_fine():
    assert reason_of(good_row(negative_box=[12.0, 2.0, 22.0, 10.0])) is None


def test_truncated_image_is_undecodable():
    data = png(64, 48)
    assert reason_of(good_row(image=data[: len(data) - 200])) == "image_undecodable"


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF"])
def test_unsupported_formats(fmt):
    assert reason_of(good_row(image=encoded(noise_image(64, 48), fmt))) == "image_unsupported_format"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_supported_formats(fmt):
    assert reason_of(good_row(image=encoded(noise_image(64, 48), fmt))) is None


def test_too_large_checked_from_header():
    assert reason_of(good_row(), max_pixels=64 * 48 - 1) == "image_too_large"
    assert reason_of(good_row(), max_pixels=64 * 48) is None


def test_decompression_bomb_header_is_too_large_not_a_crash():
    # 1-bit 20000x20000 PNG: tiny file, 400 Mpx header (> 2x Pillow's limit, so Pillow raises on open)
    data = encoded(Image.new("1", (20_000, 20_000)), optimize=True)
    assert len(data) < 200_000
    assert reason_of(good_row(image=data), max_pixels=10**12) == "image_too_large"
    assert reason_of(good_row(image=data)) == "image_too_large"


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16"])
def test_non_rgb_modes_are_converted_to_rgb_png(mode):
    if mode == "I;16":
        img = Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16))
    else:
        img = noise_image(64, 48).convert(mode)
    row = good_row(image=encoded(img))
    prompt, reason = validate_row(row)
    assert reason is None
    assert prompt.image != row["image"]
    with Image.open(io.BytesIO(prompt.image)) as out:
        assert (out.format, out.mode, out.size) == ("PNG", "RGB", (64, 48))
    np.testing.assert_array_equal(np.asarray(decode_rgb(prompt.image)), np.asarray(decode_rgb(row["image"])))


def test_cmyk_jpeg_is_converted():
    prompt, reason = validate_row(good_row(image=encoded(noise_image(64, 48).convert("CMYK"), "JPEG")))
    assert reason is None
    assert Image.open(io.BytesIO(prompt.image)).mode == "RGB"


def test_precomputed_views_are_carried_and_normalised():
    pos = encoded(noise_image(20, 10))
    neg = encoded(noise_image(20, 10).convert("L"))
    prompt, reason = validate_row(good_row(pos_images=[pos], neg_images=[neg]))
    assert reason is None
    assert prompt.pos_images == (pos,)
    assert Image.open(io.BytesIO(prompt.neg_images[0])).mode == "RGB"


def test_a_template_with_several_crops_keeps_them_all_in_order():
    crops = [png(8, 8, seed=s) for s in range(3)]
    template = "Scene <image>, zooms <crop> <crop> <crop>\nWhat is written?"
    prompt, reason = validate_row(good_row(teacher_prompt=template, pos_images=crops, neg_images=crops[::-1]))
    assert reason is None
    assert prompt.teacher_prompt == template
    assert prompt.pos_images == tuple(crops) and prompt.neg_images == tuple(crops[::-1])


def test_numpy_box_accepted():
    assert reason_of(good_row(evidence_box=np.array([1.0, 1.0, 4.0, 4.0]))) is None


def test_check_duplicate_first_wins():
    seen: set[str] = set()
    assert check_duplicate("a", seen) is None
    assert check_duplicate("b", seen) is None
    assert check_duplicate("a", seen) == "duplicate_id"
