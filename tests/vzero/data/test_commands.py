"""vzero.data.commands: `vzero data synth|check|import-vzero` end to end, through argparse, on real files."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.vzero.image_helpers import encoded, good_row, loose_schema, noise_image, write_rows
from vzero.data.commands import main, register

REPO = Path(__file__).resolve().parents[3]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_synth_is_byte_identical_for_same_args(tmp_path, capsys):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert run(capsys, "data", "synth", "--out", str(a), "--n", "6", "--seed", "9", "--image-size", "128")[0] == 0
    assert run(capsys, "synth", "--out", str(b), "--n", "6", "--seed", "9", "--image-size", "128")[0] == 0
    assert a.read_bytes() == b.read_bytes()
    assert pq.ParquetFile(a).metadata.num_rows == 6


def test_check_counts_and_quarantines_bad_rows(tmp_path, capsys):
    rows = [
        good_row("a"),
        good_row("b", question=""),
        good_row("c", image=encoded(noise_image(64, 48), "BMP")),
        good_row("a"),  # duplicate of row 0
        good_row("e", evidence_box=[0.0, 0.0, 100.0, 10.0]),
        good_row("f", image=None),
        good_row("g"),
    ]
    path = write_rows(tmp_path / "d.parquet", rows, schema=loose_schema(), row_group_size=3)
    qpath = tmp_path / "q.parquet"
    rc, out, _ = run(capsys, "data", "check", str(path), "--quarantine", str(qpath))
    assert rc == 0
    assert json.loads(out) == {
        "rows": 7,
        "ok": 2,
        "quarantined": 5,
        "reasons": {
            "question_empty": 1,
            "image_unsupported_format": 1,
            "duplicate_id": 1,
            "box_outside_image:evidence_box": 1,
            "missing_field:image": 1,
        },
    }
    q = pq.read_table(qpath)
    assert q.column("quarantine_row").to_pylist() == [1, 2, 3, 4, 5]
    assert q.column("answer").to_pylist() == ["red"] * 5  # check copies the whole row, answer included


def test_check_max_pixels(tmp_path, capsys):
    path = write_rows(tmp_path / "d.parquet", [good_row("a")])
    rc, out, _ = run(capsys, "check", str(path), "--max-pixels", "100")
    assert rc == 0 and json.loads(out)["reasons"] == {"image_too_large": 1}


def test_check_unusable_files_exit_2_with_a_named_problem(tmp_path, capsys):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    rc, out, err = run(capsys, "check", str(junk))
    assert (rc, out) == (2, "")
    assert "junk.parquet: cannot read as Parquet" in err

    schema = pa.schema([f for f in loose_schema() if f.name != "question"])
    no_question = write_rows(tmp_path / "nq.parquet", [{"id": "a"}], schema=schema)
    rc, _, err = run(capsys, "check", str(no_question))
    assert rc == 2 and "required column(s) ['question'] missing" in err

    rc, _, err = run(capsys, "check", str(tmp_path / "absent.parquet"))
    assert rc == 2 and "absent.parquet" in err

    # a single-view column of an import made before #12 would be invisible to the reader: refused, with the fix
    old = pa.schema([*loose_schema(), pa.field("pos_image", pa.binary())])
    rc, _, err = run(capsys, "check", str(write_rows(tmp_path / "old.parquet", [good_row("a")], schema=old)))
    assert rc == 2 and "['pos_image'] were replaced by ['pos_images']" in err and "import-vzero" in err


def test_import_vzero_command_writes_default_quarantine(tmp_path, capsys):
    schema = pa.schema([("prompt", pa.string()), ("images", pa.list_(pa.binary()))])
    src = tmp_path / "src.parquet"
    rows = [{"prompt": "<image>What?", "images": [encoded(noise_image(20, 20))]}, {"prompt": "<image>", "images": []}]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), src)
    out = tmp_path / "out.parquet"
    rc, stdout, _ = run(capsys, "data", "import-vzero", "--out", str(out), str(src))
    summary = json.loads(stdout)
    assert rc == 0 and (summary["ok"], summary["quarantined"]) == (1, 1)
    assert summary["quarantine"] == str(tmp_path / "out.quarantine.parquet")
    assert pq.read_table(summary["quarantine"]).column("quarantine_reason").to_pylist() == ["import_no_question"]


def test_register_mounts_under_another_parser(tmp_path):
    parser = argparse.ArgumentParser(prog="vzero")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "synth", "--out", str(tmp_path / "x.parquet"), "--n", "2", "--seed", "0"])
    assert args.func(args) == 0
    assert (tmp_path / "x.parquet").exists()


def test_module_runs_standalone(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vzero.data.commands", "check", str(tmp_path / "none.parquet")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "cannot read as Parquet" in proc.stderr
