"""Checks before any actor starts (vzero/preflight.py): pure functions on real Parquet files and a real tiny model.

Each bad input yields exactly one problem that names the config field and the file; good inputs yield none, and a
usable file is read only as far as one batch needs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import tiny_config
from vzero.errors import UserError
from vzero.preflight import (
    check_data,
    check_local_resources,
    check_model_dir,
    prepare_inputs,
    safetensors_problem,
    sample_data,
)


def _with_images_broken(src: Path, dst: Path, keep: int) -> Path:
    """`src` with every image but the first `keep` replaced by bytes no decoder accepts."""
    table = pq.read_table(src)
    images = table.column("image").to_pylist()
    images = images[:keep] + [b"not an image"] * (len(images) - keep)
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(table, dst, row_group_size=16)
    return dst


def test_usable_data_passes_after_reading_only_one_batch(synth_data) -> None:
    assert check_data(synth_data, need=4, max_pixels=10**8) == []
    sample = sample_data(synth_data, need=4, max_pixels=10**8, sample_rows=1000)
    assert (sample.read, sample.usable, sample.rows) == (4, 4, 32)


def test_too_few_usable_rows_is_one_problem_naming_field_count_and_reason(synth_data, tmp_path) -> None:
    bad = _with_images_broken(synth_data, tmp_path / "bad.parquet", keep=3)
    (problem,) = check_data(bad, need=4, max_pixels=10**8)
    assert problem.startswith(f"data.path {str(bad)!r}: only 3 of its 32 rows are usable")
    assert "rollout.prompts_per_step=4" in problem and "image_undecodable: 29" in problem


def test_a_huge_bad_file_is_judged_on_a_bounded_sample(synth_data, tmp_path) -> None:
    bad = _with_images_broken(synth_data, tmp_path / "bad.parquet", keep=0)
    sample = sample_data(bad, need=4, max_pixels=10**8, sample_rows=16)
    assert sample.read == 16 and sample.usable == 0
    (problem,) = check_data(bad, need=4, max_pixels=10**8, sample_rows=16)
    assert "only 0 of the first 16 of its 32 rows are usable" in problem


def test_unreadable_or_schemaless_files_are_named(synth_data, tmp_path) -> None:
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet")
    (problem,) = check_data(junk, need=1, max_pixels=10**8)
    assert problem.startswith("data.path:") and "cannot read as Parquet" in problem
    no_question = tmp_path / "noq.parquet"
    pq.write_table(pq.read_table(synth_data).drop(["question"]), no_question)
    (problem,) = check_data(no_question, need=1, max_pixels=10**8)
    assert "required column(s) ['question'] missing" in problem
    (problem,) = check_data(tmp_path / "absent.parquet", need=1, max_pixels=10**8)
    assert "does not exist" in problem


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def test_a_complete_model_dir_passes(tiny_model) -> None:
    assert check_model_dir(tiny_model, field_name="student.path") == []


def test_each_broken_model_dir_is_one_problem_naming_the_file(model_copy) -> None:
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])  # an interrupted copy
    (problem,) = check_model_dir(model_copy, field_name="student.path")
    assert problem.startswith(f"student.path {str(model_copy)!r}: model.safetensors is truncated")

    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    assert "git-lfs pointer" in safetensors_problem(weights)

    weights.write_bytes(data)
    (model_copy / "tokenizer.json").unlink()
    (problem,) = check_model_dir(model_copy, field_name="teacher.model.path")
    assert problem.startswith("teacher.model.path") and "no tokenizer files" in problem

    (model_copy / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    assert any("config.json has no model_type" in p for p in check_model_dir(model_copy, field_name="student.path"))
    (problem,) = check_model_dir(model_copy / "absent", field_name="student.path")
    assert "does not exist" in problem


def test_a_sharded_model_whose_index_names_a_missing_shard_is_refused(model_copy) -> None:
    index = {"metadata": {}, "weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    (problem,) = check_model_dir(model_copy, field_name="student.path")
    assert "missing: ['model-00002-of-00002.safetensors']" in problem


def test_local_resources_that_can_never_fit_are_refused(tmp_path, tiny_model, synth_data) -> None:
    cfg = tiny_config(tmp_path, tiny_model, synth_data, "rollout.num_samplers=5")  # 5 + 1 + 1 CPUs on 4
    (problem,) = check_local_resources(cfg)
    assert "request 7 CPU but the local cluster has 4 (ray.num_cpus)" in problem
    gpu = tiny_config(tmp_path, tiny_model, synth_data, "learner.resources.num_gpus=1", "ray.num_gpus=0")
    (problem,) = check_local_resources(gpu)
    assert "request 1 GPU" in problem
    joined = tiny_config(tmp_path, tiny_model, synth_data, "rollout.num_samplers=5", "ray.address=auto")
    assert check_local_resources(joined) == [], "a cluster we join is checked after connecting, against its own count"


def test_prepare_inputs_reports_every_problem_in_one_user_error(tmp_path, tiny_model, synth_data) -> None:
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"nope")
    cfg = tiny_config(tmp_path, tmp_path / "no-model", junk)
    with pytest.raises(UserError) as info:
        prepare_inputs(cfg)
    lines = str(info.value).splitlines()
    assert lines[0] == "2 problems found before starting:"
    assert lines[1].strip().startswith("data.path:") and lines[2].strip().startswith("student.path")
    prepare_inputs(tiny_config(tmp_path, tiny_model, synth_data))  # good inputs: no error
