"""vzero.views: crop geometry, hard negatives that never overlap, downsampled negatives, pixel budgets (small crops
upscaled to min_pixels, the full image kept native inside the budget), precomputed and multiple crops."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.vzero.image_helpers import encoded, noise_image
from vzero.data.validate import boxes_overlap
from vzero.records import Prompt
from vzero.views import (
    DOWNSAMPLE,
    HARD_NEGATIVE,
    NEGATIVE_MODES,
    PRECOMPUTED,
    downsample_teacher_crop,
    downsample_view,
    expand_box,
    hard_negative_box,
    hard_negative_crop,
    positive_view,
    resize_to_budget,
    views_for,
)


def prompt_for(img: Image.Image, box, **kw) -> Prompt:
    return Prompt(uid=kw.pop("uid", "u1"), image=encoded(img), question="q?", evidence_box=box, **kw)


def test_expand_box_pads_by_fraction_of_side_and_rounds_outward():
    assert expand_box((10.0, 20.0, 30.0, 60.0), 0.1, (100, 100)) == (8, 16, 32, 64)
    assert expand_box((10.5, 20.5, 30.2, 60.2), 0.0, (100, 100)) == (10, 20, 31, 61)


def test_expand_box_clips_to_image():
    assert expand_box((0.0, 1.0, 50.0, 40.0), 0.5, (50, 40)) == (0, 0, 50, 40)


def test_expand_box_rejects_box_outside_image():
    with pytest.raises(ValueError, match="outside the 50x40 image"):
        expand_box((60.0, 10.0, 70.0, 20.0), 0.1, (50, 40))


def test_resize_to_budget_keeps_aspect_and_respects_budget():
    img = noise_image(300, 100)
    out = resize_to_budget(img, max_pixels=3000)
    assert out.size[0] * out.size[1] <= 3000
    assert out.size == (94, 31)  # sqrt(3000/30000) = 0.316: floor(94.87), floor(31.6)
    assert resize_to_budget(img, max_pixels=30_000) is img  # within budget: untouched


def test_resize_to_budget_upscales_to_min_pixels():
    out = resize_to_budget(noise_image(10, 5), max_pixels=10_000, min_pixels=200)
    assert out.size == (20, 10)


def test_resize_to_budget_extreme_aspect_stays_within_budget():
    out = resize_to_budget(noise_image(1000, 1), max_pixels=10)
    assert out.size[0] * out.size[1] <= 10


def test_positive_view_is_the_padded_crop():
    img = noise_image(100, 80)
    view = positive_view(img, (10.0, 10.0, 30.0, 40.0), margin=0.1)
    np.testing.assert_array_equal(np.asarray(view), np.asarray(img.crop((8, 7, 32, 43))))


def test_positive_view_respects_pixel_budget():
    view = positive_view(noise_image(400, 400), (0.0, 0.0, 400.0, 300.0), max_pixels=10_000)
    assert view.size[0] * view.size[1] <= 10_000


def test_hard_negative_never_overlaps_expanded_evidence_and_has_same_size():
    for seed in range(500):
        rng = np.random.default_rng(seed)
        w, h = int(rng.integers(60, 200)), int(rng.integers(60, 200))
        x0, y0 = float(rng.integers(0, w - 20)), float(rng.integers(0, h - 20))
        box = (x0, y0, x0 + float(rng.integers(5, 20)), y0 + float(rng.integers(5, 20)))
        evidence = expand_box(box, 0.1, (w, h))
        neg = hard_negative_box(box, margin=0.1, size=(w, h), seed=seed, uid=f"u{seed}")
        assert neg is not None, seed
        assert not boxes_overlap(neg, evidence), (seed, neg, evidence)
        assert (neg[2] - neg[0], neg[3] - neg[1]) == (evidence[2] - evidence[0], evidence[3] - evidence[1])
        assert 0 <= neg[0] < neg[2] <= w, (seed, neg, w)
        assert 0 <= neg[1] < neg[3] <= h, (seed, neg, h)


def test_hard_negative_is_reproducible_per_seed_and_uid_and_varies_otherwise():
    box, size = (40.0, 40.0, 50.0, 50.0), (200, 200)
    first = hard_negative_box(box, margin=0.1, size=size, seed=3, uid="a")
    assert first == hard_negative_box(box, margin=0.1, size=size, seed=3, uid="a")
    others = {hard_negative_box(box, margin=0.1, size=size, seed=s, uid=u) for s in range(5) for u in "abcde"}
    assert len(others) > 20  # 25 draws over ~30k positions


def test_hard_negative_covers_all_four_sides():
    box, size = (90.0, 90.0, 110.0, 110.0), (200, 200)
    sides = set()
    for s in range(400):
        x0, _, x1, y1 = hard_negative_box(box, margin=0.0, size=size, seed=s, uid="u")
        sides.add("left" if x1 <= 90 else "right" if x0 >= 110 else "above" if y1 <= 90 else "below")
    assert sides == {"left", "right", "above", "below"}


def test_hard_negative_crop_matches_positive_size():
    img = noise_image(200, 150)
    box = (20.0, 30.0, 60.0, 50.0)
    neg = hard_negative_crop(img, box, seed=0, uid="x")
    assert neg is not None and neg.size == positive_view(img, box).size


def test_hard_negative_uses_rows_negative_box():
    img = noise_image(200, 150)
    box, negative = (20.0, 30.0, 60.0, 50.0), (120.0, 80.0, 160.0, 100.0)
    neg = hard_negative_crop(img, box, seed=0, uid="x", negative_box=negative)
    np.testing.assert_array_equal(np.asarray(neg), np.asarray(img.crop((116, 78, 164, 102))))


def test_small_image_falls_back_to_downsample_and_reports_it():
    img = noise_image(40, 40)
    box = (2.0, 2.0, 38.0, 38.0)  # expanded evidence covers the image: no room for an equal-size crop elsewhere
    assert hard_negative_crop(img, box, seed=0, uid="u1") is None
    v = views_for(prompt_for(img, box), mode=HARD_NEGATIVE)
    assert v.mode_used == DOWNSAMPLE
    assert v.neg[0].size == v.pos[0].size


def test_downsample_negative_has_positive_geometry_but_less_detail():
    img = noise_image(200, 200)
    box = (50.0, 50.0, 130.0, 110.0)
    pos = positive_view(img, box)
    neg = downsample_teacher_crop(img, box, factor=4)
    assert neg.size == pos.size
    pos_a, neg_a = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    # high-frequency energy (neighbour differences) drops a lot on noise; the mean colour stays put
    assert np.abs(np.diff(neg_a, axis=1)).mean() < 0.5 * np.abs(np.diff(pos_a, axis=1)).mean()
    assert abs(neg_a.mean() - pos_a.mean()) < 5


def test_views_for_is_deterministic():
    img = noise_image(300, 200)
    p = prompt_for(img, (10.0, 10.0, 40.0, 40.0))
    a = views_for(p, mode=HARD_NEGATIVE, seed=7)
    b = views_for(p, mode=HARD_NEGATIVE, seed=7)
    assert a.mode_used == b.mode_used == HARD_NEGATIVE
    np.testing.assert_array_equal(np.asarray(a.neg[0]), np.asarray(b.neg[0]))


def test_views_for_respects_budget_for_both_views():
    img = noise_image(400, 400)
    for mode in NEGATIVE_MODES:
        v = views_for(prompt_for(img, (0.0, 0.0, 150.0, 150.0)), mode=mode, max_pixels=5000, full=True)
        (pos,), (neg,) = v.pos, v.neg
        assert pos.size[0] * pos.size[1] <= 5000 and pos.size == neg.size
        assert v.full is not None and v.full.size[0] * v.full.size[1] <= 5000


def test_views_for_uses_precomputed_views():
    img = noise_image(100, 100)
    pos_img, neg_img = noise_image(30, 20, seed=1), noise_image(30, 20, seed=2)
    p = prompt_for(img, (0.0, 0.0, 100.0, 100.0), pos_images=(encoded(pos_img),), neg_images=(encoded(neg_img),))
    v = views_for(p, mode=HARD_NEGATIVE)
    assert v.mode_used == PRECOMPUTED and v.full is None  # the full image only when asked for
    np.testing.assert_array_equal(np.asarray(v.pos[0]), np.asarray(pos_img))
    np.testing.assert_array_equal(np.asarray(v.neg[0]), np.asarray(neg_img))


def test_precomputed_positive_without_negative_downsamples_it():
    pos_img = noise_image(30, 20, seed=1)
    p = prompt_for(noise_image(100, 100), (0.0, 0.0, 100.0, 100.0), pos_images=(encoded(pos_img),))
    v = views_for(p, mode=HARD_NEGATIVE)
    (pos,), (neg,) = v.pos, v.neg
    assert v.mode_used == DOWNSAMPLE and neg.size == pos.size == (30, 20)
    np.testing.assert_array_equal(np.asarray(pos), np.asarray(pos_img))


def test_unknown_mode_rejected():
    with pytest.raises(ValueError, match="unknown negative mode 'blur'"):
        views_for(prompt_for(noise_image(10, 10), (0.0, 0.0, 5.0, 5.0)), mode="blur")


def _detail(img: Image.Image) -> float:
    """High-frequency energy: mean absolute difference of horizontal neighbours."""
    return float(np.abs(np.diff(np.asarray(img, dtype=np.float64), axis=1)).mean())


def test_small_crop_is_upscaled_to_min_pixels_and_the_full_image_stays_native():
    img = noise_image(200, 150)
    box = (20.0, 30.0, 44.0, 46.0)  # 24 x 16 evidence: far below the teacher's minimum
    v = views_for(
        prompt_for(img, box), mode=HARD_NEGATIVE, margin=0.0, min_pixels=64 * 64, max_pixels=300 * 300, full=True
    )
    (pos,), (neg,) = v.pos, v.neg
    assert pos.size[0] * pos.size[1] >= 64 * 64 and pos.size == (79, 53)  # x sqrt(4096 / 384), aspect 3:2 kept
    assert v.mode_used == HARD_NEGATIVE and neg.size == pos.size  # presented exactly like the positive
    np.testing.assert_array_equal(np.asarray(v.full), np.asarray(img))  # inside the budget: native size and pixels
    assert v.pos[0].size == positive_view(img, box, margin=0.0, min_pixels=64 * 64, max_pixels=300 * 300).size


def test_full_image_above_the_budget_is_downscaled_into_it():
    v = views_for(
        prompt_for(noise_image(400, 300), (10.0, 10.0, 30.0, 30.0)), mode=DOWNSAMPLE, max_pixels=30_000, full=True
    )
    assert v.full.size == (200, 150)


def test_downsampled_negative_destroys_detail_before_the_zoom():
    """Upscaling first and then downsampling by 2 would keep every original pixel's detail: the negative would be
    (nearly) the positive. The negative is the capped crop degraded, then shown at the positive's size."""
    img = noise_image(120, 120)
    box = (10.0, 10.0, 40.0, 40.0)
    v = views_for(prompt_for(img, box), mode=DOWNSAMPLE, margin=0.0, min_pixels=120 * 120, max_pixels=10**6)
    (pos,), (neg,) = v.pos, v.neg
    assert pos.size == neg.size == (120, 120)
    native = img.crop((10, 10, 40, 40))
    np.testing.assert_array_equal(np.asarray(neg), np.asarray(downsample_view(native, 2.0, pos.size)))
    too_late = downsample_view(pos, 2.0)  # the wrong order, for contrast
    assert _detail(neg) < 0.6 * _detail(too_late)


def test_several_crops_keep_their_order_and_get_one_negative_each():
    crops = [noise_image(30, 20, seed=s) for s in (1, 2, 3)]
    negs = [noise_image(30, 20, seed=s) for s in (4, 5, 6)]
    full = noise_image(100, 100)
    p = prompt_for(full, (0.0, 0.0, 100.0, 100.0), pos_images=tuple(encoded(c) for c in crops))
    v = views_for(p, mode=HARD_NEGATIVE, min_pixels=40 * 40)
    assert v.mode_used == DOWNSAMPLE and len(v.pos) == len(v.neg) == 3  # no box for a hard negative of each
    for crop, pos, neg in zip(crops, v.pos, v.neg, strict=True):
        assert pos.size == neg.size == (49, 33)  # each upscaled to >= 1600 px on its own
        np.testing.assert_array_equal(
            np.asarray(pos), np.asarray(resize_to_budget(crop, max_pixels=10**6, min_pixels=1600))
        )
    given = Prompt(**{**p.__dict__, "neg_images": tuple(encoded(n) for n in negs)})
    w = views_for(given, mode=HARD_NEGATIVE)
    assert w.mode_used == PRECOMPUTED
    for neg, want in zip(w.neg, negs, strict=True):
        np.testing.assert_array_equal(np.asarray(neg), np.asarray(want))
