"""The teacher's views of a prompt: evidence crop(s), a negative view per crop, the full image (vzero-method.md).

Pixel budget [min_pixels, max_pixels] (the teacher's `ModelSource` budget; the authors: 65,536 and 16,777,216 px for
every image). Every view is shown at a size inside it: a larger image is downscaled (bicubic, aspect kept), a
smaller one UPSCALED to min_pixels, so a small evidence crop is really seen zoomed in (more vision tokens than the
same region has in the full image); an image already inside the budget keeps its native size (the full image, in
the usual case). The model's processor then only rounds the sides to its patch grid.

- positive: the evidence box, padded by `margin` (a fraction of the box side) and clipped to the image, then brought
  into the budget.
- `hard_negative_crop`: a crop of exactly the positive crop's size from a region that does not overlap the expanded
  evidence box, drawn uniformly over all such positions with an RNG seeded by (seed, uid), so a prompt gets the same
  negative in every epoch and on every machine; it gets the positive's resizing. A row's `negative_box`
  (user-chosen) is used instead when given, and resized to the positive view's size. If the image has no room for a
  non-overlapping crop of that size (evidence covers most of it), it falls back to `downsample_teacher_crop` and
  says so in `mode_used`.
- `downsample_teacher_crop`: the crop (capped at max_pixels, BEFORE any upscaling: downsampling an upscaled crop by
  2 would destroy nothing it had) downsampled by `factor` (bicubic) and upsampled (bicubic) to the positive view's
  size. Presenting it at the same size keeps the teacher's geometry (same number of image tokens, same layout) so
  the only difference between the two teacher passes is the destroyed fine detail; a smaller image would also change
  the token count and position ids, confounding the contrast.
- precomputed crops (imported datasets: `pos_images`, several allowed, and `neg_images`, one per crop) replace the
  computed ones; each is brought into the budget on its own, and `mode_used` is "precomputed" for precomputed
  negatives. Several crops without negatives get a downsampled negative each (a hard negative needs the box).
- the full image (`full=True`, for a teacher prompt that shows it: `teacher.context: full_and_crop`) is brought into
  the same budget; the negative replay shows the same full image, only the crops change.

Pure Pillow; knows nothing about models, tokens or Parquet.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

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


def _present(crop: Image.Image, *, min_pixels: int, max_pixels: int) -> tuple[Image.Image, Image.Image]:
    """(crop capped at `max_pixels`, crop as the teacher sees it: the capped one upscaled to `min_pixels` if smaller).

    The capped image holds the detail the teacher can get at this budget: a negative's detail is destroyed from it,
    before any upscaling (downsampling an upscaled crop by 2 would destroy nothing the original had)."""
    capped = resize_to_budget(crop, max_pixels=max_pixels)
    return capped, resize_to_budget(capped, max_pixels=max_pixels, min_pixels=min_pixels)


def _sized(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img if img.size == size else img.resize(size, Image.Resampling.BICUBIC)


def positive_view(
    img: Image.Image,
    box: Box,
    *,
    margin: float = DEFAULT_MARGIN,
    max_pixels: int = DEFAULT_VIEW_MAX_PIXELS,
    min_pixels: int = 0,
) -> Image.Image:
    """The evidence crop: `expand_box`, then down to `max_pixels` if larger, up to `min_pixels` if smaller."""
    return _present(img.crop(expand_box(box, margin, img.size)), min_pixels=min_pixels, max_pixels=max_pixels)[1]


def downsample_view(
    view: Image.Image, factor: float = DEFAULT_DOWNSAMPLE_FACTOR, size: tuple[int, int] | None = None
) -> Image.Image:
    """`view` downsampled by `factor` (bicubic) and upsampled back (bicubic) to `size` (default: its own)."""
    if factor < 1:
        raise ValueError(f"downsample factor must be >= 1, got {factor}")
    w, h = view.size
    small = view.resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.Resampling.BICUBIC)
    return small.resize(size or (w, h), Image.Resampling.BICUBIC)


def downsample_teacher_crop(
    img: Image.Image,
    box: Box,
    *,
    margin: float = DEFAULT_MARGIN,
    max_pixels: int = DEFAULT_VIEW_MAX_PIXELS,
    min_pixels: int = 0,
    factor: float = DEFAULT_DOWNSAMPLE_FACTOR,
) -> Image.Image:
    """The positive view with its fine detail destroyed (at the capped resolution), at the positive view's size."""
    capped, shown = _present(img.crop(expand_box(box, margin, img.size)), min_pixels=min_pixels, max_pixels=max_pixels)
    return downsample_view(capped, factor, shown.size)


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
    min_pixels: int = 0,
    negative_box: Box | None = None,
    size: tuple[int, int] | None = None,
) -> Image.Image | None:
    """An irrelevant crop presented exactly like the positive view, or None if the image has no room.

    A crop of the evidence's own size goes through the positive view's resizing (so both get the same treatment);
    `negative_box` (expanded by the same margin) is used instead when given. The result has `size` (default: the
    positive view's size), resized there directly from the crop when it does not have it already.
    """
    size = size or positive_view(img, box, margin=margin, max_pixels=max_pixels, min_pixels=min_pixels).size
    if negative_box is not None:
        region: IntBox | None = expand_box(negative_box, margin, img.size)
    else:
        region = hard_negative_box(box, margin=margin, size=img.size, seed=seed, uid=uid)
    if region is None:
        return None
    crop = img.crop(region)
    shown = _present(crop, min_pixels=min_pixels, max_pixels=max_pixels)[1]
    return shown if shown.size == size else _sized(crop, size)


@dataclass(frozen=True)
class TeacherViews:
    """What the teacher sees of one prompt: its evidence crop(s), one negative per crop, optionally the full image."""

    pos: tuple[Image.Image, ...]  # evidence crops, in the row's `<crop>` order (one for a box-only row)
    neg: tuple[Image.Image, ...]  # the i-th replaces the i-th crop in the negative replay
    mode_used: str  # negative actually used: the mode asked for, a fallback, or "precomputed"
    full: Image.Image | None = None  # the full image within the budget (when asked for: `<image>` in the prompt)


def views_for(
    prompt: Prompt,
    *,
    mode: str,
    margin: float = DEFAULT_MARGIN,
    max_pixels: int = DEFAULT_VIEW_MAX_PIXELS,
    min_pixels: int = 0,
    factor: float = DEFAULT_DOWNSAMPLE_FACTOR,
    seed: int = 0,
    full: bool = False,
) -> TeacherViews:
    """The teacher's views of one prompt at the pixel budget [min_pixels, max_pixels] (module docstring).

    `mode_used` is `mode`, or `downsample_teacher_crop` when a hard negative does not fit (or the row holds several
    precomputed crops and no negatives: a hard negative needs the evidence box), or "precomputed" when the prompt
    carries `neg_images`. Record it (Trajectory.negative_mode): fallbacks are reported, not hidden.
    """
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"unknown negative mode {mode!r}; choose one of {NEGATIVE_MODES}")
    budget = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    image: Image.Image | None = None
    if prompt.pos_images:
        natives = [decode_rgb(b) for b in prompt.pos_images]
    else:
        image = decode_rgb(prompt.image)
        natives = [image.crop(expand_box(prompt.evidence_box, margin, image.size))]
    presented = [_present(c, **budget) for c in natives]
    pos = tuple(shown for _, shown in presented)
    if full and image is None:
        image = decode_rgb(prompt.image)
    full_view = resize_to_budget(image, **budget) if full and image is not None else None

    if prompt.neg_images:
        neg = tuple(_present(decode_rgb(b), **budget)[1] for b in prompt.neg_images)
        return TeacherViews(pos, neg, PRECOMPUTED, full_view)
    if mode == HARD_NEGATIVE and len(pos) == 1:
        if image is None:
            image = decode_rgb(prompt.image)
        hard = hard_negative_crop(
            image,
            prompt.evidence_box,
            seed=seed,
            uid=prompt.uid,
            margin=margin,
            negative_box=prompt.negative_box,
            size=pos[0].size,  # a precomputed positive has its own size: present the negative like it
            **budget,
        )
        if hard is not None:
            return TeacherViews(pos, (hard,), HARD_NEGATIVE, full_view)
    neg = tuple(downsample_view(capped, factor, shown.size) for capped, shown in presented)
    return TeacherViews(pos, neg, DOWNSAMPLE, full_view)


def _uid_key(uid: str) -> int:
    """A stable 64-bit key for a uid (Python's hash() is salted per process, so it can't seed anything)."""
    return int.from_bytes(hashlib.sha256(uid.encode("utf-8")).digest()[:8], "little")
