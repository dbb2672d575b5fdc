"""A synthetic fine-grained visual task: one small target hidden in a large cluttered image.

Each row is a cluttered image (smooth random background texture, random lines, many distractor shapes in palette
colours) with ONE small target whose side is 4-6% of the image side: at 336 px that is 13-20 px, i.e. 4-7 px once
the full image is downsampled to ~112 px (illegible: a digit or a shape outline is a blob), but a clear ~20 px object
in the evidence crop. Three families (the family goes into `source`):

- "color": "What color is the small square?" (distractors are circles / triangles / crosses, never squares or
  frames, so "the square" is unique; answer: a colour word)
- "digit": "Which digit is written inside the small box?" (one white box with a dark digit; distractor digits are
  drawn loose, never boxed; answer: a digit)
- "shape": "What shape is inside the small red frame?" (distractor frames are never red; answer: a shape word)

Answers use only the words in COLORS, SHAPES and DIGITS (the toy tokenizer is built from them). `evidence_box` is the
target's box in pixels; about half the rows also get a `negative_box`: a same-size region not overlapping the
evidence (a gap of at least a quarter of the side, so margin-expanded crops stay disjoint too).

Deterministic: row i depends only on (seed, i, image_size), drawn with numpy's PCG64 and Pillow; the same arguments
give byte-identical Parquet on the same Pillow/zlib/pyarrow build.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vzero.data.schema import DEFAULT_ROW_GROUP_SIZE, DatasetWriter
from vzero.images import encode_png

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
FAMILIES: tuple[str, ...] = ("color", "digit", "shape")
QUESTION_TEMPLATES: dict[str, str] = {
    "color": "What color is the small square?",
    "digit": "Which digit is written inside the small box?",
    "shape": "What shape is inside the small red frame?",
}
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}

TARGET_FRACTION = (0.04, 0.06)  # target side as a fraction of the image side
DISTRACTORS_PER_336 = 45  # distractor count at 336 px; scales with image area
MIN_IMAGE_SIZE = 64


def synth_rows(n: int, seed: int, image_size: int = 336) -> list[dict[str, Any]]:
    """`n` rows in our schema (id, image, question, evidence_box, negative_box, answer, source), in memory."""
    return [synth_row(i, seed, image_size) for i in range(n)]


def write_synth(
    path: str | os.PathLike[str],
    n: int,
    seed: int,
    image_size: int = 336,
    *,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
) -> int:
    """Stream `n` synthetic rows to a Parquet file (never all in memory); returns the row count."""
    with DatasetWriter(path, row_group_size=row_group_size) as writer:
        for i in range(n):
            writer.write(synth_row(i, seed, image_size))
    return n


def synth_row(index: int, seed: int, image_size: int = 336) -> dict[str, Any]:
    """Row `index` of the dataset for `seed`: independent of how many rows are generated."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} so a 4-6% target is drawable, got {image_size}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got {index=} {seed=}")
    rng = np.random.default_rng([seed, index])
    family = FAMILIES[int(rng.integers(len(FAMILIES)))]
    side = max(8, round(image_size * rng.uniform(*TARGET_FRACTION)))
    x0, y0 = (int(v) for v in rng.integers(2, image_size - side - 2, size=2))
    box = (x0, y0, x0 + side, y0 + side)

    img = _background(rng, image_size)
    draw = ImageDraw.Draw(img)
    _distractors(draw, rng, image_size, family, keep_clear=_grow(box, side // 2))
    answer = _target(draw, rng, family, box)
    row: dict[str, Any] = {
        "id": f"synth-{seed}-{index:07d}",
        "image": encode_png(img),
        "question": QUESTION_TEMPLATES[family],
        "evidence_box": [float(v) for v in box],
        "negative_box": None,
        "answer": answer,
        "source": family,
    }
    if rng.random() < 0.5:
        neg = _negative_box(rng, image_size, box)
        row["negative_box"] = None if neg is None else [float(v) for v in neg]
    return row


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth muted colour noise (bilinear upsampling: no square blocks that could pass for a target) plus lines."""
    coarse = rng.integers(70, 190, size=(8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(12 * size / 336) + 4):
        pts = [tuple(int(v) for v in rng.integers(0, size, size=2)) for _ in range(2)]
        draw.line(pts, fill=_random_color(rng), width=int(rng.integers(1, 3)))
    return img


def _distractors(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, family: str, keep_clear: tuple[int, int, int, int]
) -> None:
    """Target-sized clutter that never reproduces the target's defining feature and never touches `keep_clear`."""
    count = int(DISTRACTORS_PER_336 * (size / 336) ** 2)
    lo, hi = round(size * TARGET_FRACTION[0]), round(size * TARGET_FRACTION[1])
    drawn = tries = 0
    while drawn < count and tries < 20 * count:
        tries += 1
        side = max(6, int(rng.integers(lo, hi + 1)))
        x, y = (int(v) for v in rng.integers(0, size - side, size=2))
        box = (x, y, x + side, y + side)
        kind = rng.random()
        if _overlaps(box, keep_clear):
            continue
        drawn += 1
        if family == "digit" and kind < 0.3:
            _digit(draw, box, str(int(rng.integers(10))), _random_color(rng))
        elif family == "shape" and kind < 0.3:
            frame = COLORS[int(rng.integers(1, len(COLORS)))]  # index 0 is red: never a red frame
            _frame(draw, box, PALETTE[frame])
            _shape(draw, _grow(box, -max(2, side // 5)), SHAPES[int(rng.integers(len(SHAPES)))], _random_color(rng))
        else:
            shapes = SHAPES[1:] if family in ("color", "digit") else SHAPES  # no squares where "the square/box" matters
            _shape(draw, box, shapes[int(rng.integers(len(shapes)))], _random_color(rng))


def _target(draw: ImageDraw.ImageDraw, rng: np.random.Generator, family: str, box: tuple[int, int, int, int]) -> str:
    side = box[2] - box[0]
    if family == "color":
        color = COLORS[int(rng.integers(len(COLORS)))]
        _shape(draw, box, "square", PALETTE[color])
        return color
    if family == "digit":
        digit = DIGITS[int(rng.integers(len(DIGITS)))]
        draw.rectangle(box, fill=PALETTE["white"], outline=PALETTE["black"], width=1)
        _digit(draw, box, digit, PALETTE["black"])
        return digit
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    inner_color = COLORS[int(rng.integers(1, len(COLORS)))]  # not red, so the shape stands out from its frame
    _frame(draw, box, PALETTE["red"])
    _shape(draw, _grow(box, -max(2, side // 5)), shape, PALETTE[inner_color])
    return shape


def _shape(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], shape: str, fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        t = max(1, (x1 - x0) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - t // 2, y0, cx - t // 2 + t, y1), fill=fill)
        draw.rectangle((x0, cy - t // 2, x1, cy - t // 2 + t), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _frame(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], color: tuple[int, int, int]) -> None:
    draw.rectangle(box, outline=color, width=max(1, (box[2] - box[0]) // 10))


def _digit(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], digit: str, color: tuple[int, int, int]) -> None:
    """The digit centred in `box`, in Pillow's bundled default font sized to ~75% of the box."""
    font = ImageFont.load_default(size=max(6, round((box[3] - box[1]) * 0.75)))
    draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), digit, fill=color, font=font, anchor="mm")


def _negative_box(
    rng: np.random.Generator, size: int, box: tuple[int, int, int, int]
) -> tuple[int, int, int, int] | None:
    """A same-size box at least side/4 away from `box` on some axis, or None after 100 misses (tiny images)."""
    side = box[2] - box[0]
    keep_clear = _grow(box, max(1, side // 4))
    for _ in range(100):
        x, y = (int(v) for v in rng.integers(0, size - side, size=2))
        cand = (x, y, x + side, y + side)
        if not _overlaps(cand, keep_clear):
            return cand
    return None


def _grow(box: tuple[int, int, int, int], by: int) -> tuple[int, int, int, int]:
    return (box[0] - by, box[1] - by, box[2] + by, box[3] + by)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return PALETTE[COLORS[int(rng.integers(len(COLORS)))]]
