"""Bad input at scale: 10,000 rows, about 5 % of them bad in every way the data checks can meet in a Parquet file
(vzero/data/bad_rows.py plants them and knows where). `vzero data check` and a full epoch of the training stream
count every kind exactly, and the quarantine files hold exactly the planted rows with their reasons; the stream
serves every good row once. (Throughput against the clean file is a benchmark: bench/data_stream.py.)"""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import pytest

from vzero.data.bad_rows import KINDS
from vzero.data.commands import check_file
from vzero.data.quarantine import REASON_COLUMN, ROW_COLUMN, QuarantineWriter
from vzero.data.stream import PromptStream

N = 10_000


@pytest.fixture(scope="module")
def bad_file(bad_rows_10k):
    return bad_rows_10k


def _quarantined(path) -> dict[int, str]:
    table = pq.read_table(path, columns=[ROW_COLUMN, REASON_COLUMN])
    rows = table.column(ROW_COLUMN).to_pylist()
    assert len(rows) == len(set(rows)), "each bad row quarantined once"
    return dict(zip(rows, table.column(REASON_COLUMN).to_pylist(), strict=True))


def test_the_plant_has_every_kind_at_about_five_percent(bad_file) -> None:
    _, planted = bad_file
    assert len(planted) == N // 20
    counts = Counter(planted.values())
    assert set(counts) == set(KINDS) and min(counts.values()) >= 15


def test_data_check_counts_every_kind_exactly(bad_file, tmp_path) -> None:
    path, planted = bad_file
    summary = check_file(path, quarantine=tmp_path / "q.parquet")
    assert summary["rows"] == N and summary["ok"] == N - len(planted)
    assert summary["reasons"] == dict(Counter(planted.values()))
    assert _quarantined(tmp_path / "q.parquet") == planted


def test_one_epoch_of_the_stream_quarantines_exactly_the_planted_rows_and_serves_every_good_one(
    bad_file, tmp_path
) -> None:
    path, planted = bad_file
    writer = QuarantineWriter(tmp_path / "q.parquet")
    stream = PromptStream(path, seed=3, quarantine=writer)
    uids = []
    while stream.epoch == 0:
        uids += [p.uid for p in stream.next_batch(16)]
    writer.close()
    good = N - len(planted)
    assert len(set(uids[:good])) == good, "every good row once in the epoch, before any row comes again"
    assert stream.reasons == Counter(planted.values())
    assert _quarantined(tmp_path / "q.parquet") == planted
