"""The test hook that holds the driver at a named point (vzero/fault_points.py): inert unless asked, holds once at
exactly the listed (point, step), says so in its pause file, and goes on when the file is deleted."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from vzero import fault_points


def test_unset_means_every_point_passes_at_once(monkeypatch) -> None:
    monkeypatch.delenv(fault_points.ENV_AT, raising=False)
    for point in fault_points.POINTS:
        fault_points.reached(point, 1)  # would block forever if it held


def test_a_listed_point_holds_once_until_its_pause_file_is_deleted(monkeypatch, tmp_path) -> None:
    pause = tmp_path / "paused"
    monkeypatch.setenv(fault_points.ENV_AT, "learn@3, checkpoint@4")
    monkeypatch.setenv(fault_points.ENV_FILE, str(pause))
    fault_points.reached("learn", 2)  # another step of a listed point
    fault_points.reached("rollout", 3)  # another point of a listed step
    assert not pause.exists()
    done = threading.Event()
    thread = threading.Thread(target=lambda: (fault_points.reached("learn", 3), done.set()))
    thread.start()
    deadline = time.time() + 30
    while not pause.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert json.loads(pause.read_text()) == {"point": "learn", "step": 3, "pid": os.getpid()}
    time.sleep(0.2)
    assert not done.is_set(), "held while the file exists"
    pause.unlink()
    thread.join(timeout=30)
    assert done.is_set()
    fault_points.reached("learn", 3)  # once per process: passes now
    assert not pause.exists()


def test_a_misspelt_point_is_an_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(fault_points.ENV_AT, "lean@3")
    monkeypatch.setenv(fault_points.ENV_FILE, str(tmp_path / "p"))
    with pytest.raises(ValueError, match="'lean@3' is not <point>@<step>"):
        fault_points.reached("learn", 3)
