"""vzero.data.import_vzero: the authors' verl-style rows become ours; unconvertible rows are quarantined, never lost.

The central test builds a Parquet file in exactly the authors' column layout (`prompt`, `images`, `teacher_raw_prompt`,
`teacher_images`, `teacher_neg_raw_prompt`, `teacher_neg_images`, `reward_model`, `extra_info`) holding every image
form (bytes, path, `file:` / `file://`, base64, `{"image": ...}` with its own pixel budget), a row with three crops, a
remote URL, a path and a symlink that leave the data root, and crop counts that do not match the markers."""

from __future__ import annotations

import base64
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.vzero.image_helpers import encoded, noise_image
from vzero.data.import_vzero import ConversionError, import_vzero, question_from_prompt, template_from_prompt
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
        "notes": {"system_turn_dropped": 4},
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
    assert (first["image"], first["pos_images"], first["neg_images"]) == (IMG, [POS], [NEG])
    assert (first["answer"], first["source"], first["negative_box"], first["teacher_prompt"]) == (
        "red",
        "vstar",
        None,
        None,
    )
    assert table[1]["neg_images"] is None
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
    v = views_for(prompt, mode="hard_negative_crop")
    assert v.mode_used == PRECOMPUTED
    np.testing.assert_array_equal(np.asarray(v.pos[0]), np.asarray(decode_rgb(POS)))
    np.testing.assert_array_equal(np.asarray(v.neg[0]), np.asarray(decode_rgb(NEG)))


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
    assert rows_a[0]["pos_images"] == [POS] and rows_a[1]["pos_images"] is None
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


# -- the authors' exact column layout --------------------------------------------------------------------------------
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
IMAGE_ENTRIES = pa.list_(
    pa.struct(
        [
            ("bytes", pa.binary()),
            ("path", pa.string()),
            ("image", pa.string()),
            ("min_pixels", pa.int64()),
            ("max_pixels", pa.int64()),
        ]
    )
)
AUTHORS_SCHEMA = pa.schema(
    [
        ("prompt", MESSAGES),
        ("images", IMAGE_ENTRIES),
        ("teacher_raw_prompt", MESSAGES),
        ("teacher_images", IMAGE_ENTRIES),
        ("teacher_neg_raw_prompt", MESSAGES),
        ("teacher_neg_images", IMAGE_ENTRIES),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
    ]
)
TEACHER = "<image>\nThe evidence, zoomed in: <crop>\nWhat color is the cup?"
CROPS = [encoded(noise_image(20, 16, seed=s)) for s in range(10, 13)]
NEGS = [encoded(noise_image(20, 16, seed=s)) for s in range(20, 23)]


def entry(data=None, *, path=None, image=None, min_pixels=None, max_pixels=None):
    return {"bytes": data, "path": path, "image": image, "min_pixels": min_pixels, "max_pixels": max_pixels}


def user(text):
    return [{"role": "user", "content": text}]


def authors_row(index, *, teacher=TEACHER, images=None, crops=None, negs=None, neg_prompt=None):
    return {
        "prompt": user("<image>\nWhat color is the cup?"),
        "images": images if images is not None else [entry(IMG)],
        "teacher_raw_prompt": user(teacher) if isinstance(teacher, str) else teacher,
        "teacher_images": crops if crops is not None else [entry(POS)],
        "teacher_neg_raw_prompt": neg_prompt if neg_prompt is not None else user(teacher),
        "teacher_neg_images": negs if negs is not None else [entry(NEG)],
        "reward_model": {"ground_truth": "red", "style": "rule"},
        "extra_info": {"index": index, "split": "train"},
    }


def test_authors_layout_keeps_templates_every_crop_and_image_form_and_refuses_what_it_cannot_keep(tmp_path):
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "full.png").write_bytes(IMG)
    (root / "imgs" / "crop.png").write_bytes(POS)
    (tmp_path / "outside.png").write_bytes(POS)  # a real, readable file: refused for where it is, not for being absent
    (root / "imgs" / "sneaky.png").symlink_to(tmp_path / "outside.png")
    tiny = encoded(noise_image(8, 6, seed=5))
    b64 = "data:image/png;base64," + base64.b64encode(NEG).decode()
    three = "<image> Left: <crop> middle: <crop> right: <crop> Which one is red?"
    rows = [
        # 0: bytes everywhere; a system turn and a differently worded negative prompt (both noted, not used)
        authors_row(
            0, teacher=[{"role": "system", "content": "Be brief."}, *user(TEACHER)], neg_prompt=user("<image><crop>?")
        ),
        # 1: a relative path, `file:` and `file://` (absolute, inside the root), base64
        authors_row(
            1,
            images=[entry(path="imgs/full.png")],
            crops=[entry(image="file:imgs/crop.png")],
            negs=[entry(image=b64)],
        ),
        authors_row(2, crops=[entry(image=f"file://{root / 'imgs' / 'crop.png'}")]),
        # 3: three crops, three negatives, in order
        authors_row(3, teacher=three, crops=[entry(c) for c in CROPS], negs=[entry(n) for n in NEGS]),
        # 4: a crop with its own pixel budget: upscaled at import, as the authors' loader does
        authors_row(4, crops=[entry(tiny, min_pixels=48 * 36, max_pixels=10_000)], negs=[]),
        authors_row(5, images=[entry(image="https://example.com/cup.png")]),  # 5: remote: never fetched
        authors_row(6, crops=[entry(path="../outside.png")]),  # 6: leaves the data root
        authors_row(7, crops=[entry(path="imgs/sneaky.png")]),  # 7: a symlink out of it
        authors_row(8, teacher="<image><crop><crop>Q?"),  # 8: two markers, one crop: not truncated, refused
        authors_row(9, negs=[entry(NEG), entry(NEG)]),  # 9: two negatives for one crop
        authors_row(10, crops=[entry(POS, min_pixels=500, max_pixels=100)]),  # 10: min above max
        authors_row(11, teacher="<crop> without the full image"),  # 11: crop-only wording: kept as it is
    ]
    src = write(root / "train.parquet", rows, AUTHORS_SCHEMA)
    report = import_vzero([src], tmp_path / "out.parquet", quarantine=tmp_path / "q.parquet")

    assert report.as_dict() == {
        "rows": 12,
        "ok": 6,
        "quarantined": 6,
        "reasons": {
            "import_remote_image:images": 1,
            "import_path_outside_root:teacher_images": 2,
            "import_crop_count:teacher_images": 1,
            "import_crop_count:teacher_neg_images": 1,
            "import_bad_pixel_budget:teacher_images": 1,
        },
        "notes": {"system_turn_dropped": 1, "teacher_neg_raw_prompt_ignored": 1, "image_resized_to_own_budget": 1},
    }
    assert pq.read_table(tmp_path / "q.parquet").column("quarantine_row").to_pylist() == [5, 6, 7, 8, 9, 10]
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out.parquet").to_pylist()}
    assert sorted(out, key=int) == ["0", "1", "2", "3", "4", "11"]
    assert out["0"]["teacher_prompt"] == TEACHER  # wording, whitespace, marker order: verbatim
    assert out["0"]["question"] == "What color is the cup?"
    assert (out["1"]["image"], out["1"]["pos_images"], out["1"]["neg_images"]) == (IMG, [POS], [NEG])
    assert out["2"]["pos_images"] == [POS]
    assert (out["3"]["teacher_prompt"], out["3"]["pos_images"], out["3"]["neg_images"]) == (three, CROPS, NEGS)
    (resized,) = out["4"]["pos_images"]
    assert decode_rgb(resized).size == (48, 36) and out["4"]["neg_images"] is None
    assert out["11"]["teacher_prompt"] == "<crop> without the full image"


def test_data_root_is_where_relative_paths_start(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "full.png").write_bytes(IMG)
    (tmp_path / "files").mkdir()
    src = write(tmp_path / "files" / "t.parquet", [authors_row(0, images=[entry(path="full.png")])], AUTHORS_SCHEMA)
    report = import_vzero(
        [src], tmp_path / "o.parquet", quarantine=tmp_path / "q.parquet", data_root=tmp_path / "store"
    )
    assert report.ok == 1
    report = import_vzero(
        [src], tmp_path / "o2.parquet", quarantine=tmp_path / "q2.parquet"
    )  # default: the file's folder
    assert dict(report.reasons) == {"import_image_unreadable:images": 1}


def test_crops_without_a_template_cannot_be_ordered_and_are_refused(tmp_path):
    row = chat_row(0, teacher_images=[img(POS), img(NEG)])
    src = write(tmp_path / "s.parquet", [row], CHAT_SCHEMA)
    report = import_vzero([src], tmp_path / "o.parquet", quarantine=tmp_path / "q.parquet")
    assert dict(report.reasons) == {"import_crop_count:teacher_images": 1}  # the first crop is not taken silently


@pytest.mark.parametrize(
    ("prompt", "template"),
    [
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": "<image>\n A <crop> b "}],
            "<image>\n A <crop> b ",
        ),
        (json.dumps([{"role": "user", "content": "<crop>x"}]), "<crop>x"),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " z<crop>"}]}], "<image> z<crop>"),
    ],
)
def test_template_from_prompt_is_verbatim(prompt, template):
    assert template_from_prompt(prompt) == template


@pytest.mark.parametrize(
    "prompt",
    [
        [{"role": "user", "content": "a <crop>"}, {"role": "user", "content": "b"}],  # two user turns
        [{"role": "user", "content": [{"type": "image", "image": "x.png"}]}],  # an inline image payload
        5,
    ],
)
def test_template_from_prompt_refuses_what_it_cannot_keep(prompt):
    with pytest.raises(ConversionError, match="import_bad_prompt:teacher_raw_prompt"):
        template_from_prompt(prompt)
