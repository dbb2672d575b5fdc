"""`vzero train` as a user runs it: a user error is one line on stderr and exit status 2, before Ray or any actor
starts; an internal error keeps its traceback. Real subprocesses of the real CLI on real files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BASE = ["-m", "vzero.cli", "train", "--config", "configs/tiny-cpu.yaml", "data.synth=null", "student.build=null"]


def _train(tmp_path: Path, *overrides: str, prelude: str | None = None) -> subprocess.CompletedProcess:
    args = [*BASE, f"output_dir={tmp_path / 'run'}", *overrides]
    cmd = [sys.executable, *args] if prelude is None else [sys.executable, "-c", prelude, *args[2:]]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _assert_one_line_user_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "Started a local Ray instance" not in res.stdout + res.stderr


@pytest.fixture
def broken_images(synth_data, tmp_path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(synth_data)
    junk = pa.array([b"\x89PNG broken"] * table.num_rows, pa.binary())
    path = tmp_path / "broken.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", junk), path)
    return path


def test_unusable_data_fails_with_one_line_naming_the_file(tmp_path, tiny_model, broken_images) -> None:
    res = _train(tmp_path, f"data.path={broken_images}", f"student.path={tiny_model}")
    _assert_one_line_user_error(res, "data.path", str(broken_images), "only 0 of its 32 rows are usable", "image_")
    assert not (tmp_path / "run").exists(), "nothing is written before the checks pass"


def test_missing_model_dir_fails_with_one_line_naming_the_field(tmp_path, synth_data) -> None:
    res = _train(tmp_path, f"data.path={synth_data}", f"student.path={tmp_path / 'nowhere'}")
    _assert_one_line_user_error(res, "student.path", "model directory does not exist")


def test_impossible_resources_fail_with_one_line(tmp_path, synth_data, tiny_model) -> None:
    res = _train(tmp_path, f"data.path={synth_data}", f"student.path={tiny_model}", "rollout.num_samplers=8")
    _assert_one_line_user_error(res, "resources:", "request 10 CPU", "ray.num_cpus")


def test_an_internal_error_keeps_its_traceback(tmp_path, synth_data, tiny_model) -> None:
    """A bug (here: a check that crashes) is not a user error: exit status 1 and the full traceback."""
    prelude = (
        "import sys, vzero.preflight\n"
        "def crash(cfg):\n"
        "    raise ZeroDivisionError('a bug inside vzero')\n"
        "vzero.preflight.prepare_inputs = crash\n"
        "from vzero.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    res = _train(tmp_path, f"data.path={synth_data}", f"student.path={tiny_model}", prelude=prelude)
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stderr and "ZeroDivisionError: a bug inside vzero" in res.stderr
