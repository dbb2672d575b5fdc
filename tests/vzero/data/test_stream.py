"""vzero.data.stream: epoch-aware shuffled batches, quarantine on the fly, exact resume, and never reading `answer`."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.encrypted_parquet import decryption_properties, write_with_encrypted_answer
from tests.vzero.image_helpers import good_row, loose_schema, write_rows
from vzero.data.quarantine import QuarantineWriter
from vzero.data.schema import SCHEMA, DataFileError
from vzero.data.stream import NotEnoughPromptsError, PromptStream


def dataset(tmp_path, n=10, *, bad=(), dup=(), row_group_size=4, name="d.parquet"):
    """n rows r0..r{n-1}; indices in `bad` get an empty question; indices in `dup` reuse the id of row 0."""
    rows = []
    for i in range(n):
        row = good_row(f"r{i}")
        if i in bad:
            row["question"] = "  "
        if i in dup:
            row["id"] = "r0"
        rows.append(row)
    return write_rows(tmp_path / name, rows, row_group_size=row_group_size)


def uids(batch):
    return [p.uid for p in batch]


def test_each_epoch_visits_every_row_once_in_a_new_order(tmp_path):
    stream = PromptStream(dataset(tmp_path, 12), seed=0)
    epochs = [uids(stream.next_batch(6)) + uids(stream.next_batch(6)) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == sorted(f"r{i}" for i in range(12))
    assert len({tuple(o) for o in epochs}) == 3
    assert stream.epoch == 2


def test_batches_crossing_epochs_have_distinct_uids_and_skip_nothing(tmp_path):
    stream = PromptStream(dataset(tmp_path, 10), seed=4)
    seen: Counter[str] = Counter()
    deferrals = 0
    for _ in range(15):  # 60 prompts = 6 epochs of 10 rows
        batch = uids(stream.next_batch(4))
        assert len(batch) == 4 == len(set(batch))
        seen.update(batch)
        deferrals += bool(stream.pending)
    assert deferrals > 0  # seed 4 does hit a next-epoch row already in the batch: the deferral path ran
    assert set(seen.values()) == {6}


def test_same_seed_same_order_other_seed_other_order(tmp_path):
    path = dataset(tmp_path, 12)
    a, b, c = (PromptStream(path, seed=s) for s in (3, 3, 4))
    assert uids(a.next_batch(12)) == uids(b.next_batch(12)) != uids(c.next_batch(12))


def test_no_shuffle_is_file_order(tmp_path):
    stream = PromptStream(dataset(tmp_path, 6), seed=0, shuffle=False)
    assert uids(stream.next_batch(4)) == ["r0", "r1", "r2", "r3"]
    assert uids(stream.next_batch(4)) == ["r4", "r5", "r0", "r1"]


def test_small_file_gets_a_uniform_permutation_large_file_reads_group_windows(tmp_path):
    small = PromptStream(dataset(tmp_path, 12, row_group_size=4), seed=0, cache_row_groups=4)
    assert sorted(small.epoch_order(0).tolist()) == list(range(12))
    big = PromptStream(dataset(tmp_path, 32, row_group_size=4, name="big.parquet"), seed=0, cache_row_groups=2)
    order = big.epoch_order(0).tolist()
    assert sorted(order) == list(range(32))
    for w in range(0, 32, 8):  # each window of 8 rows spans exactly 2 row groups (of 4 rows)
        assert len({r // 4 for r in order[w : w + 8]}) == 2
    big.next_batch(20)
    assert len(big._cache) <= 2


def test_resume_gives_the_same_next_batch(tmp_path):
    path = dataset(tmp_path, 10, bad={3}, dup={7})
    original = PromptStream(path, seed=5)
    for _ in range(3):
        original.next_batch(3)
    state = json.loads(json.dumps(original.state_dict()))  # must survive JSON
    assert state["epoch"] == 1 and state["pending"]  # mid-epoch, with deferred rows: the hard case
    fourth = uids(original.next_batch(3))
    fifth = uids(original.next_batch(3))

    resumed = PromptStream(path, seed=5)
    resumed.load_state_dict(state)
    assert uids(resumed.next_batch(3)) == fourth
    assert uids(resumed.next_batch(3)) == fifth
    assert resumed.reasons == original.reasons


def test_resume_refuses_other_seed(tmp_path):
    path = dataset(tmp_path, 6)
    state = PromptStream(path, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1 but this stream has 2"):
        PromptStream(path, seed=2).load_state_dict(state)


def test_bad_rows_quarantined_once_across_epochs_and_resume(tmp_path):
    path = dataset(tmp_path, 10, bad={2, 5})
    qpath = tmp_path / "q.parquet"
    with QuarantineWriter(qpath) as q:
        stream = PromptStream(path, seed=0, quarantine=q)
        for _ in range(4):  # 32 prompts of 8 valid rows: 4 epochs
            assert not {"r2", "r5"} & set(uids(stream.next_batch(8)))
        resumed = PromptStream(path, seed=0, quarantine=q)
        resumed.load_state_dict(stream.state_dict())
        resumed.next_batch(8)
    assert stream.quarantined == 2 and stream.reasons == {"question_empty": 2}
    assert resumed.quarantined == 2
    table = pq.read_table(qpath)
    assert sorted(table.column("id").to_pylist()) == ["r2", "r5"]
    assert sorted(table.column("quarantine_row").to_pylist()) == [2, 5]
    assert "answer" not in table.column_names  # the training path never copies it


def test_duplicate_ids_first_occurrence_wins(tmp_path):
    path = dataset(tmp_path, 8, dup={3, 6})  # rows 3 and 6 claim id r0
    stream = PromptStream(path, seed=5)
    batch = stream.next_batch(6)
    assert sorted(uids(batch)) == ["r0", "r1", "r2", "r4", "r5", "r7"]
    r0 = next(p for p in batch if p.uid == "r0")
    assert r0.image == good_row("r0")["image"]  # row 0's content, not row 3's or 6's
    assert stream.reasons == {"duplicate_id": 2}


def test_too_few_valid_rows_is_a_clear_error(tmp_path):
    path = dataset(tmp_path, 5, bad={0, 1})
    with pytest.raises(NotEnoughPromptsError, match=r"batch of 6 distinct prompts .* at most 5 of its 5 rows"):
        PromptStream(path, seed=0).next_batch(6)
    stream = PromptStream(path, seed=0)
    with pytest.raises(NotEnoughPromptsError, match=r"batch of 4 .* at most 3 of its 5 rows .*question_empty"):
        stream.next_batch(4)
    assert len(stream.next_batch(3)) == 3


def test_file_missing_required_column_is_refused(tmp_path):
    schema = pa.schema([f for f in loose_schema() if f.name != "evidence_box"])
    rows = [{k: v for k, v in good_row().items() if k != "evidence_box"}]
    path = write_rows(tmp_path / "x.parquet", rows, schema=schema)
    with pytest.raises(DataFileError, match=r"required column\(s\) \['evidence_box'\] missing"):
        PromptStream(path, seed=0)


def test_not_parquet_is_refused(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("hello")
    with pytest.raises(DataFileError, match="cannot read as Parquet"):
        PromptStream(path, seed=0)


# ---- the training path never reads `answer` --------------------------------------------------------------------


def test_stream_works_when_answer_is_encrypted_and_unreadable(tmp_path):
    """Only `answer` is encrypted (own column key; plaintext footer). Reading it without keys fails; the stream,
    which must never touch it, reads the whole file fine; with the keys, the answers are really there."""
    path = tmp_path / "enc.parquet"
    rows = [good_row(f"r{i}", answer=f"secret-{i}") for i in range(6)]
    write_with_encrypted_answer(pa.Table.from_pylist(rows, schema=SCHEMA), path, row_group_size=2)

    with pytest.raises(OSError, match=r"[Dd]ecrypt"):
        pq.ParquetFile(path).read(columns=["answer"])
    answers = (
        pq.ParquetFile(path, decryption_properties=decryption_properties())
        .read(columns=["answer"])
        .column(0)
        .to_pylist()
    )
    assert answers == [f"secret-{i}" for i in range(6)]

    stream = PromptStream(path, seed=0)
    seen = uids(stream.next_batch(6)) + uids(stream.next_batch(6))
    assert sorted(seen) == sorted([f"r{i}" for i in range(6)] * 2)
    assert stream.quarantined == 0
