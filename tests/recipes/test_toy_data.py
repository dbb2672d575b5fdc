"""vzero.recipes.toy without Ray: the context-window data transform, the plans, and the work-dir guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from vzero.data.stream import PromptStream
from vzero.data.synth import write_synth
from vzero.images import decode_rgb
from vzero.recipes.toy import METHODS, check_work, plan_for, run_overrides, write_context_view
from vzero.views import positive_view


def test_context_view_keeps_labels_cuts_the_student_image_and_precomputes_teacher_views(tmp_path) -> None:
    raw, out = tmp_path / "raw.parquet", tmp_path / "ctx.parquet"
    write_synth(raw, n=10, seed=4, image_size=224)
    write_context_view(raw, out, context=3.0, margin=0.25, seed=4)
    before, after = pq.read_table(raw).to_pylist(), pq.read_table(out).to_pylist()
    for a, b in zip(before, after, strict=True):
        assert (a["id"], a["question"], a["answer"], a["source"]) == (b["id"], b["question"], b["answer"], b["source"])
        full, win = decode_rgb(a["image"]), decode_rgb(b["image"])
        side = a["evidence_box"][2] - a["evidence_box"][0]
        assert win.width == win.height == round(3.0 * side)
        x0, y0, x1, y1 = b["evidence_box"]
        assert 0 <= x0 < x1 <= win.width and 0 <= y0 < y1 <= win.height
        assert x1 - x0 == side  # same target, shifted into window coordinates
        dx, dy = a["evidence_box"][0] - x0, a["evidence_box"][1] - y0
        crop_full = np.asarray(full.crop((int(dx), int(dy), int(dx) + win.width, int(dy) + win.height)))
        assert (np.asarray(win) == crop_full).all(), "the window is a crop of the original image"
        (pos_bytes,) = b["pos_images"]
        pos = decode_rgb(pos_bytes)
        assert pos.tobytes() == positive_view(full, tuple(a["evidence_box"]), margin=0.25).tobytes()
        assert decode_rgb(b["neg_images"][0]).size == pos.size and b["negative_box"] is None
    stream = PromptStream(out, seed=0)  # the training path accepts every transformed row
    assert len(stream.next_batch(10)) == 10 and stream.quarantined == 0


def test_plans_and_overrides() -> None:
    full, smoke, small = plan_for("tiny"), plan_for("tiny", smoke=True), plan_for("small", device="cuda")
    assert len(full.seeds) >= 3 and smoke.seeds == (0,) and smoke.steps < full.steps
    assert small.preset == "small" and small.n_train > full.n_train
    assert plan_for("tiny", steps=10).eval_every == 10, "the final checkpoint is always evaluated"
    assert plan_for("tiny", lr=None).lr == full.lr
    tmp = Path("m")
    ov = {m: run_overrides(full, m, 1, tmp, tmp, tmp) for m in METHODS}
    shared = [set(v) - set(METHODS[m]) for m, v in ov.items()]
    assert shared[0] == shared[1] == shared[2], "methods differ only in their gate keys"
    gpu = run_overrides(small, "opd", 0, tmp, tmp, tmp)
    assert "ray.num_gpus=1" in gpu and "learner.resources.num_gpus=0.3" in gpu


def test_work_dir_made_for_another_plan_is_refused(tmp_path) -> None:
    check_work(tmp_path, plan_for("tiny", smoke=True))
    check_work(tmp_path, plan_for("tiny", smoke=True, steps=5))  # label-free sizes may change
    with pytest.raises(ValueError, match=r"another plan .*n_train"):
        check_work(tmp_path, plan_for("tiny", smoke=True, n_train=99))
