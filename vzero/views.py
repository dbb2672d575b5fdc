"""The teacher's two views of a prompt: the evidence crop and a negative view (vzero-method.md, "Negative view").

- positive: the evidence box, padded by `margin` (a fraction of the box side) and clipped to the image, then resized
  to the teacher's pixel budget.
- `hard_negative_crop`: a crop of exactly the positive crop's size from a region that does not overlap the expanded
  evidence box, drawn uniformly over all such positions with an RNG seeded by (seed, uid), so a prompt gets the same
  negative in every epoch and on every machine. A row's `negative_box` (user-chosen) is used instead when given, and
  resized to the positive view's size. If the image has no room for a non-overlapping crop of that size (evidence
  covers most of it), it falls back to `downsample_teacher_crop` and says so in `mode_used`.
- `downsample_teacher_crop`: the positive view downsampled by `factor` (bicubic) and then upsampled back (bicubic) to
  the positive view's size. Presenting it at the same size keeps the teacher's geometry (same number of image
  tokens, same layout) so the only difference between the two teacher passes is the destroyed fine detail; a smaller
  image would also change the token count and position ids, confounding the contrast.
- precomputed views (imported datasets carry `pos_image` / `neg_image`) replace the computed ones; they are
  budget-resized like the rest, and `mode_used` is "precomputed" for a precomputed negative.

Pure Pillow; knows nothing about models, tokens or Parquet.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from PIL import Image

from vzero.images import decode_rgb
from vzero.records import Box, Prompt

IntBox = tuple[int, int, int, int]

HARD_NEGATIVE = "hard_negative_crop"
DOWNSAMPLE = "downsample_teacher_crop"
PRECOMPUTED = "precomputed"
NEGATIVE_MODES: tuple[str, ...] = (HARD_NEGATIVE, DOWNSAMPLE)

DEFAULT_MARGIN = 0.1  # fraction of the box side added on each side: a little context around the evidence
DEFAULT_VIEW_MAX_PIXELS = 1024 * 28 * 28  # 802,816 px: a common Qwen-VL processor budget (1024 patches of 28 px)
DEFAULT_DOWNSAMPLE_FACTOR = 2.0  # official default


def expand_box(box: Box, margin: float, size: tuple[int, int]) -> IntBox:
    """Pad `box` by `margin` x its width/height on each side, round outward to pixels, clip to the image `size`.

    Raises ValueError if the box is empty or nothing of it lies inside the image.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    width, height = size
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {box} has no area")
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    out = (
        max(0, math.floor(x0 - dx)),
        max(0, math.floor(y0 - dy)),
        min(width, math.ceil(x1 + dx)),
        min(height, math.ceil(y1 + dy)),
    )
    if out[2] <= out[0] or out[3] <= out[1]:
        raise ValueError(f"box {box} lies outside the {width}x{height} image")
    return out


def resize_to_budget(img: Image.Image, *, max_pixels: int, min_pixels: int = 0) -> Image.Image:
    """Resize (bicubic, aspect kept) only if w*h is outside [min_pixels, max_pixels]; otherwise return `img` itself."""
    if max_pixels < 1 or min_pixels > max_pixels:
        raise ValueError(f"need 1 <= max_pixels and min_pixels <= max_pixels, got {min_pixels=} {max_pixels=}")
    w, h = img.size
    area = w * h
    if area > max_pixels:
        scale = math.sqrt(max_pixels / area)
        new = (max(1, math.floor(w * scale)), max(1, math.floor(h * scale)))
        # a 1-pixel floor on a very thin image can push the area back over: shrink the long side until it fits
        while new[0] * new[1] > max_pixels:
            new = (new[0] - 1, new[1]) if new[0] >= new[1] else (new[0], new[1] - 1)
    elif area < min_pixels:
        scale = math.sqrt(min_pixels / area)
        new = (math.ceil(w * scale), math.ceil(h * scale))
        if new[0] * new[1] > max_pixels:
            new = (math.floor(w * scale), math.floor(h * scale))
    else:
        return img
    return img.resize(new, Image.Resampling.BICUBIC)


def positive_view(
    img: Image.Image, box: Box, *, margin: float = DEFAULT_MARGIN, max_pixels: int = DEFAULT_VIEW_MAX_PIXELS
) -> Image.Image:
    """The evidence crop: `expand_box` then `resize_to_budget`."""
    return resize_to_budget(img.crop(expand_box(box, margin, img.size)), max_pixels=max_pixels)


def downsample_view(view: Image.Image, factor: float = DEFAULT_DOWNSAMPLE_FACTOR) -> Image.Image:
    """`view` downsampled by `factor` (bicubic) and upsampled back to its own size (see module docstring)."""
    if factor < 1:
        raise ValueError(f"downsample factor must be >= 1, got {factor}")
    w, h = view.size
    small = view.resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.Resampling.BICUBIC)
    return small.resize((w, h), Image.Resampling.BICUBIC)


def downsample_teacher_crop(
    img: Image.Image,
    box: Box,
    *,
    margin: float = DEFAULT_MARGIN,
    max_pixels: int = DEFAULT_VIEW_MAX_PIXELS,
    factor: float = DEFAULT_DOWNSAMPLE_FACTOR,
) -> Image.Image:
    """The positive view with its fine detail destroyed, at the positive view's size."""
    return downsample_view(positive_view(img, box, margin=margin, max_pixels=max_pixels), factor)


def hard_negative_box(box: Box, *, margin: float, size: tuple[int, int], seed: int, uid: str) -> IntBox | None:
    """A crop box of the expanded evidence box's size that does not overlap it, or None if none fits.

    Uniform over all integer positions: the valid top-left corners split into four disjoint sets (fully left of,
    right of, above, below the evidence; above/below only for x positions not already counted left/right).
    """
    width, height = size
    ex0, ey0, ex1, ey1 = expand_box(box, margin, size)
    cw, ch = ex1 - ex0, ey1 - ey0
    max_x, max_y = width - cw, height - ch  # last valid top-left corner
    mid_x = (max(0, ex0 - cw + 1), min(max_x, ex1 - 1))  # x ranges whose crop overlaps the evidence columns
    regions = [  # (x_lo, x_hi, y_lo, y_hi), inclusive
        (0, ex0 - cw, 0, max_y),  # left
        (ex1, max_x, 0, max_y),  # right
        (mid_x[0], mid_x[1], 0, ey0 - ch),  # above
        (mid_x[0], mid_x[1], ey1, max_y),  # below
    ]
    counts = [max(0, x1 - x0 + 1) * max(0, y1 - y0 + 1) for x0, x1, y0, y1 in regions]
    total = sum(counts)
    if total == 0:
        return None
    rng = np.random.default_rng([seed, _uid_key(uid)])
    k = int(rng.integers(total))
    for (x_lo, x_hi, y_lo, _), count in zip(regions, counts, strict=True):
        if k < count:
            cols = x_hi - x_lo + 1
            x, y = x_lo + k % cols, y_lo + k // cols
            return (x, y, x + cw, y + ch)
        k -= count
    raise AssertionError("unreachable: k < total")


def hard_negative_crop(
    img: Image.Image,
    box: Box,
    *,
    seed: int,
    uid: str,
    margin: float = DEFAULT_MARGIN,
    max_pixels: int = DEFAULT_VIEW_MAX_PIXELS,
    negative_box: Box | None = None,
) -> Image.Image | None:
    """An irrelevant crop presented exactly like the positive view (same size), or None if the image has no room.

    With `negative_box`, that region (expanded by the same margin) is used and resized to the positive view's size.
    """
    pos_size = positive_view(img, box, margin=margin, max_pixels=max_pixels).size
    if negative_box is not None:
        crop = img.crop(expand_box(negative_box, margin, img.size))
        return crop if crop.size == pos_size else crop.resize(pos_size, Image.Resampling.BICUBIC)
    neg = hard_negative_box(box, margin=margin, size=img.size, seed=seed, uid=uid)
    if neg is None:
        return None
    return resize_to_budget(img.crop(neg), max_pixels=max_pixels)


def views_for(
    prompt: Prompt,
    *,
    mode: str,
    margin: float = DEFAULT_MARGIN,
    max_pixels: int = DEFAULT_VIEW_MAX_PIXELS,
    factor: float = DEFAULT_DOWNSAMPLE_FACTOR,
    seed: int = 0,
) -> tuple[Image.Image, Image.Image, str]:
    """(positive view, negative view, mode actually used) for one prompt.

    `mode_used` is `mode`, or `downsample_teacher_crop` when a hard negative does not fit, or "precomputed" when the
    prompt carries `neg_image`. Record it (Trajectory.negative_mode): fallbacks are reported, not hidden.
    """
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"unknown negative mode {mode!r}; choose one of {NEGATIVE_MODES}")
    full: Image.Image | None = None
    if prompt.pos_image is not None:
        pos = resize_to_budget(decode_rgb(prompt.pos_image), max_pixels=max_pixels)
    else:
        full = decode_rgb(prompt.image)
        pos = positive_view(full, prompt.evidence_box, margin=margin, max_pixels=max_pixels)
    if prompt.neg_image is not None:
        return pos, resize_to_budget(decode_rgb(prompt.neg_image), max_pixels=max_pixels), PRECOMPUTED
    if mode == HARD_NEGATIVE:
        if full is None:
            full = decode_rgb(prompt.image)
        neg = hard_negative_crop(
            full,
            prompt.evidence_box,
            seed=seed,
            uid=prompt.uid,
            margin=margin,
            max_pixels=max_pixels,
            negative_box=prompt.negative_box,
        )
        if neg is not None:
            if neg.size != pos.size:  # only when pos is precomputed: present the negative like the positive
                neg = neg.resize(pos.size, Image.Resampling.BICUBIC)
            return pos, neg, HARD_NEGATIVE
    return pos, downsample_view(pos, factor), DOWNSAMPLE


def _uid_key(uid: str) -> int:
    """A stable 64-bit key for a uid (Python's hash() is salted per process, so it can't seed anything)."""
    return int.from_bytes(hashlib.sha256(uid.encode("utf-8")).digest()[:8], "little")
