"""vzero.data.synth: deterministic, valid, answerable only from the evidence box, answers from the fixed vocabulary."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vzero.data.synth import (
    COLORS,
    DIGITS,
    FAMILIES,
    PALETTE,
    QUESTION_TEMPLATES,
    SHAPES,
    synth_row,
    synth_rows,
    write_synth,
)
from vzero.data.validate import boxes_overlap, validate_row

ROWS = synth_rows(60, seed=5)


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    a, b, c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"
    write_synth(a, 12, seed=3, image_size=128)
    write_synth(b, 12, seed=3, image_size=128)
    write_synth(c, 12, seed=4, image_size=128)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_row_does_not_depend_on_n():
    assert synth_rows(3, seed=5) == ROWS[:3]


def test_every_row_validates_and_answers_come_from_the_vocabulary():
    vocab = {"color": set(COLORS), "digit": set(DIGITS), "shape": set(SHAPES)}
    for row in ROWS:
        _, reason = validate_row(row)
        assert reason is None, (row["id"], reason)
        assert row["source"] in FAMILIES
        assert row["question"] == QUESTION_TEMPLATES[row["source"]]
        assert row["answer"] in vocab[row["source"]]
    assert {r["source"] for r in ROWS} == set(FAMILIES)


def test_target_is_small():
    for row in ROWS:
        x0, y0, x1, y1 = row["evidence_box"]
        assert x1 - x0 == y1 - y0
        assert 0.035 * 336 <= x1 - x0 <= 0.065 * 336


def test_about_half_the_rows_have_a_disjoint_same_size_negative_box():
    rows = synth_rows(200, seed=1, image_size=224)
    negatives = [r for r in rows if r["negative_box"] is not None]
    assert 70 <= len(negatives) <= 130
    for r in negatives:
        ev, neg = r["evidence_box"], r["negative_box"]
        assert not boxes_overlap(ev, neg)
        assert (neg[2] - neg[0], neg[3] - neg[1]) == (ev[2] - ev[0], ev[3] - ev[1])
        assert 0 <= neg[0] < neg[2] <= 224
        assert 0 <= neg[1] < neg[3] <= 224


def test_evidence_box_shows_the_answer():
    """The pixel at the target's centre is the answer colour (color family) or the framed shape's colour (shape),
    the box is white with dark digit strokes (digit): the box really holds the evidence."""
    for row in ROWS:
        img = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
        x0, y0, x1, y1 = (int(v) for v in row["evidence_box"])
        centre = tuple(int(v) for v in img[(y0 + y1) // 2, (x0 + x1) // 2])
        patch = img[y0 + 1 : y1, x0 + 1 : x1]
        if row["source"] == "color":
            assert centre == PALETTE[row["answer"]], row["id"]
            assert (patch == PALETTE[row["answer"]]).all(axis=-1).mean() > 0.95
        elif row["source"] == "shape":
            assert centre in {c for name, c in PALETTE.items() if name != "red"}, row["id"]
            assert (img[y0, x0:x1] == PALETTE["red"]).all()  # the frame's top edge
        else:
            dark = (patch.sum(axis=-1) < 200).mean()
            white = (patch == 255).all(axis=-1).mean()
            assert 0.02 < dark < 0.6 and white > 0.3, row["id"]


def test_distinct_digits_draw_distinct_pixels():
    """The digit family is not degenerate: two rows with different answers differ inside the box."""
    digits = [r for r in ROWS if r["source"] == "digit"]
    crops = {}
    for r in digits:
        x0, y0, x1, y1 = (int(v) for v in r["evidence_box"])
        img = Image.open(io.BytesIO(r["image"])).convert("L").crop((x0, y0, x1, y1)).resize((16, 16))
        crops.setdefault(r["answer"], np.asarray(img, dtype=np.float64))
    answers = sorted(crops)
    assert len(answers) >= 3
    for a in answers:
        for b in answers:
            if a < b:
                assert np.abs(crops[a] - crops[b]).mean() > 5, (a, b)


def test_written_file_has_all_columns(tmp_path):
    path = tmp_path / "s.parquet"
    write_synth(path, 5, seed=0, image_size=96)
    table = pq.read_table(path)
    assert table.num_rows == 5
    assert {"id", "image", "question", "evidence_box", "negative_box", "answer", "source"} <= set(table.column_names)
    assert len(set(table.column("id").to_pylist())) == 5


def test_too_small_image_rejected():
    with pytest.raises(ValueError, match="image_size must be >= 64"):
        synth_row(0, 0, image_size=32)
