"""Checkpoint directories on disk: pruning keeps the numerically newest, and re-writing a step never leaves zero
copies of it (the old copy is renamed away before the new one moves in, and deleted only after)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vzero import checkpoint as ckpt


def _write(root: Path, step: int, text: str = "x") -> Path:
    tmp = ckpt.begin(root, step)
    (tmp / "trainer_state.json").write_text(text)
    return ckpt.commit(tmp, keep_last=2)


def test_pruning_keeps_the_numerically_newest_checkpoints(tmp_path) -> None:
    root = tmp_path / "checkpoints"
    for step in (999998, 999999, 1000000):  # "step_1000000" sorts before "step_999998" as text
        _write(root, step)
    assert sorted(p.name for p in root.iterdir()) == ["step_1000000", "step_999999"]
    assert ckpt.latest_checkpoint(root) == root / "step_1000000"


def test_rewriting_a_step_renames_before_it_deletes(tmp_path, monkeypatch) -> None:
    root = tmp_path / "checkpoints"
    _write(root, 5, "first")
    tmp = ckpt.begin(root, 5)
    (tmp / "trainer_state.json").write_text("second")
    real_replace = os.replace

    def crash_when_the_new_copy_moves_in(src, dst):  # a crash (kill, full disk) at the worst moment
        if Path(src) == tmp:
            raise OSError("crashed while moving the new checkpoint into place")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_when_the_new_copy_moves_in)
    with pytest.raises(OSError, match="crashed"):
        ckpt.commit(tmp, keep_last=2)
    monkeypatch.undo()
    survivor = ckpt.latest_checkpoint(root)
    assert survivor is not None and ckpt.checkpoint_step(survivor) == 5, "a complete copy of step 5 is left"
    assert (survivor / "trainer_state.json").read_text() == "first"
    final = _write(root, 5, "third")  # the next write of that step cleans up the renamed old copy
    assert sorted(p.name for p in root.iterdir()) == ["step_000005"]
    assert (final / "trainer_state.json").read_text() == "third"
