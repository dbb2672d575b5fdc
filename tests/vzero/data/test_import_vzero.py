"""vzero.data.import_vzero: the authors' verl-style rows become ours; unconvertible rows are quarantined, never lost."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.vzero.image_helpers import encoded, noise_image
from vzero.data.import_vzero import ConversionError, import_vzero, question_from_prompt
from vzero.data.schema import DataFileError
from vzero.data.stream import PromptStream
from vzero.images import decode_rgb
from vzero.views import PRECOMPUTED, views_for

IMG = encoded(noise_image(40, 30, seed=1))
POS = encoded(noise_image(20, 16, seed=2))
NEG = encoded(noise_image(20, 16, seed=3))

IMAGE_LIST = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
CHAT_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", IMAGE_LIST),
        ("teacher_images", IMAGE_LIST),
        ("teacher_neg_images", IMAGE_LIST),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
    ]
)


def img(data=IMG, path=None):
    return {"bytes": data, "path": path}


def chat(text, system="You are helpful."):
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def chat_row(index=None, **kw):
    row = {
        "data_source": "vstar",
        "prompt": chat("<image>\nWhat color is the cup?"),
        "images": [img()],
        "teacher_images": [img(POS)],
        "teacher_neg_images": [img(NEG)],
        "ability": "vqa",
        "reward_model": {"ground_truth": "red", "style": "rule"},
        "extra_info": None if index is None else {"index": index, "split": "train"},
    }
    row.update(kw)
    return row


def write(path, rows, schema):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=3)
    return path


def test_chat_schema_rows_convert_and_bad_ones_are_quarantined(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(IMG)
    rows = [
        chat_row(100),  # 0: the normal case
        chat_row(None, teacher_neg_images=None),  # 1: no index -> stem-row id; no precomputed negative
        chat_row(101, images=[]),  # 2: no student image
        chat_row(102, images=[img(), img()]),  # 3: two student images
        chat_row(103, images=[img(None, "imgs/a.png")]),  # 4: bytes missing, relative path readable
        chat_row(104, prompt=chat("<image>  ")),  # 5: no question text
        chat_row(105, images=[img(b"garbage")]),  # 6: undecodable
        chat_row(100),  # 7: duplicate id
        chat_row(106, images=[img(None, "imgs/missing.png")]),  # 8: unreadable path
        chat_row(107, reward_model=None),  # 9: no answer: fine
    ]
    src = write(tmp_path / "train.parquet", rows, CHAT_SCHEMA)
    out, qpath = tmp_path / "out.parquet", tmp_path / "q.parquet"
    report = import_vzero([src], out, quarantine=qpath)

    assert report.as_dict() == {
        "rows": 10,
        "ok": 4,
        "quarantined": 6,
        "reasons": {
            "import_no_image:images": 1,
            "import_multiple_images:images": 1,
            "import_no_question": 1,
            "image_undecodable": 1,
            "duplicate_id": 1,
            "import_image_unreadable:images": 1,
        },
    }
    table = pq.read_table(out).to_pylist()
    assert [r["id"] for r in table] == ["100", "train-1", "103", "107"]
    first = table[0]
    assert first["question"] == "What color is the cup?"
    assert first["evidence_box"] == [0.0, 0.0, 40.0, 30.0]
    assert (first["image"], first["pos_image"], first["neg_image"]) == (IMG, POS, NEG)
    assert (first["answer"], first["source"], first["negative_box"]) == ("red", "vstar", None)
    assert table[1]["neg_image"] is None
    assert table[2]["image"] == IMG  # read from imgs/a.png
    assert table[3]["answer"] is None

    quarantined = pq.read_table(qpath)
    assert quarantined.column("quarantine_row").to_pylist() == [2, 3, 5, 6, 7, 8]
    assert "prompt" in quarantined.column_names  # the source row as it was
    assert quarantined.column("extra_info").to_pylist()[4] == {"index": 100, "split": "train"}


def test_imported_file_streams_with_precomputed_views(tmp_path):
    src = write(tmp_path / "s.parquet", [chat_row(i) for i in range(3)], CHAT_SCHEMA)
    out = tmp_path / "out.parquet"
    import_vzero([src], out, quarantine=tmp_path / "q.parquet")
    prompt = PromptStream(out, seed=0).next_batch(1)[0]
    pos, neg, mode_used = views_for(prompt, mode="hard_negative_crop")
    assert mode_used == PRECOMPUTED
    np.testing.assert_array_equal(np.asarray(pos), np.asarray(decode_rgb(POS)))
    np.testing.assert_array_equal(np.asarray(neg), np.asarray(decode_rgb(NEG)))


def test_string_prompts_binary_images_and_content_parts(tmp_path):
    flat = pa.schema([("prompt", pa.string()), ("images", pa.list_(pa.binary())), ("teacher_images", pa.binary())])
    a = write(
        tmp_path / "flat.parquet",
        [
            {"prompt": "<image>Which digit is shown?", "images": [IMG], "teacher_images": POS},
            {"prompt": json.dumps(chat("<image> How many cats?")), "images": [IMG], "teacher_images": None},
        ],
        flat,
    )
    parts_schema = pa.schema(
        [
            (
                "prompt",
                pa.list_(
                    pa.struct(
                        [
                            ("role", pa.string()),
                            ("content", pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))),
                        ]
                    )
                ),
            ),
            ("images", pa.binary()),
        ]
    )
    parts_prompt = [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Where is it?"}]}
    ]
    b = write(tmp_path / "parts.parquet", [{"prompt": parts_prompt, "images": IMG}], parts_schema)

    out_a, out_b = tmp_path / "a_out.parquet", tmp_path / "b_out.parquet"
    assert import_vzero([a], out_a, quarantine=tmp_path / "qa.parquet").ok == 2
    assert import_vzero([b], out_b, quarantine=tmp_path / "qb.parquet").ok == 1
    rows_a = pq.read_table(out_a).to_pylist()
    assert [r["question"] for r in rows_a] == ["Which digit is shown?", "How many cats?"]
    assert [r["id"] for r in rows_a] == ["flat-0", "flat-1"]
    assert rows_a[0]["pos_image"] == POS and rows_a[1]["pos_image"] is None
    assert rows_a[0]["source"] == "flat"
    assert pq.read_table(out_b).column("question").to_pylist() == ["Where is it?"]


def test_two_sources_with_clashing_indices_keep_the_first(tmp_path):
    a = write(tmp_path / "a.parquet", [chat_row(0), chat_row(1)], CHAT_SCHEMA)
    b = write(tmp_path / "b.parquet", [chat_row(1), chat_row(2)], CHAT_SCHEMA)
    report = import_vzero([a, b], tmp_path / "out.parquet", quarantine=tmp_path / "q.parquet")
    assert (report.ok, dict(report.reasons)) == (3, {"duplicate_id": 1})


def test_source_without_prompt_column_is_unusable(tmp_path):
    src = write(tmp_path / "x.parquet", [{"images": [IMG]}], pa.schema([("images", pa.list_(pa.binary()))]))
    with pytest.raises(DataFileError, match=r"column\(s\) \['prompt'\] missing"):
        import_vzero([src], tmp_path / "out.parquet", quarantine=tmp_path / "q.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_incompatible_sources_are_refused(tmp_path):
    a = write(tmp_path / "a.parquet", [chat_row(0)], CHAT_SCHEMA)
    b = write(
        tmp_path / "b.parquet",
        [{"prompt": "q", "images": 5}],
        pa.schema([("prompt", pa.string()), ("images", pa.int64())]),
    )
    with pytest.raises(DataFileError, match="cannot be unified"):
        import_vzero([a, b], tmp_path / "out.parquet", quarantine=tmp_path / "q.parquet")


@pytest.mark.parametrize(
    ("prompt", "question"),
    [
        ("<image>\n  What   is this? ", "What is this?"),
        ("<image><image>Compare\nthe two", "Compare\nthe two"),
        ([{"role": "user", "content": "a <image> b"}, {"role": "assistant", "content": "x"}], "a b"),
        ({"role": "user", "content": ["part one", {"type": "text", "text": "part two"}]}, "part one\npart two"),
        ("[not json", "[not json"),
    ],
)
def test_question_from_prompt(prompt, question):
    assert question_from_prompt(prompt) == question


@pytest.mark.parametrize(
    ("prompt", "reason"), [(None, "import_bad_prompt"), (5, "import_bad_prompt"), ("<image>", "import_no_question")]
)
def test_question_from_bad_prompt(prompt, reason):
    with pytest.raises(ConversionError, match=reason):
        question_from_prompt(prompt)
