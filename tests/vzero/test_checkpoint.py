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


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: _truncate(d / "model" / "model.safetensors"), "model/model.safetensors is truncated"),
        (lambda d: (d / "optimizer.safetensors").unlink(), "missing optimizer.safetensors"),
        (lambda d: (d / "rng.safetensors").write_bytes(b""), "rng.safetensors is truncated (0 bytes)"),
        (lambda d: (d / "trainer_state.json").write_text('{"step": 4, "pol'), "trainer_state.json is unreadable"),
        (lambda d: (d / "model" / "model.safetensors").unlink(), "model/ holds no *.safetensors weights"),
        (lambda d: (d / "model" / "config.json").unlink(), "missing model/config.json"),
    ],
)
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, caplog, damage, named) -> None:
    from tests.vzero.checkpoint_helpers import write_checkpoint

    root = tmp_path / "checkpoints"
    good = write_checkpoint(root, 2)
    newest = write_checkpoint(root, 4)
    assert ckpt.problems(good) == [] and ckpt.latest_valid_checkpoint(root) == newest
    damage(newest)
    assert ckpt.latest_checkpoint(root) == newest, "the COMPLETE marker alone cannot tell"
    with caplog.at_level("WARNING", logger="vzero"):
        assert ckpt.latest_valid_checkpoint(root) == good
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(newest) in warning and named in warning


def test_unfinished_checkpoint_writes_are_removed_and_finished_ones_kept(tmp_path) -> None:
    from tests.vzero.checkpoint_helpers import write_checkpoint

    root = tmp_path / "checkpoints"
    kept = write_checkpoint(root, 2)
    crashed = ckpt.begin(root, 4)  # a writer killed mid-write
    (crashed / "optimizer.safetensors").write_bytes(b"partial")
    assert ckpt.remove_partial(root) == [crashed]
    assert sorted(p.name for p in root.iterdir()) == [kept.name]
