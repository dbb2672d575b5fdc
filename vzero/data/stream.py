"""Stream validated `Prompt`s from one Parquet file in shuffled, epoch-aware, resumable order.

What it holds in memory: the `id` column (for duplicate detection), row-group offsets, the set of rows found bad,
and an LRU of at most `cache_row_groups` decoded row groups. Pixels are read on demand, and only `TRAIN_COLUMNS`
are ever requested from the file, so the evaluation-only `answer` column is never fetched or decrypted (the test
suite proves this on a file whose `answer` column is encrypted).

Order. Epoch e's order is a function of (seed, e) alone: row groups are permuted, taken in windows of
`cache_row_groups` groups, and the rows of each window are permuted. Every row group is thus read once per epoch
(with shuffle, a uniform permutation over a file with many row groups would read a whole group for almost every
row); a file of at most `cache_row_groups` groups gets a uniform permutation of all its rows.

Batches. `next_batch(k)` returns exactly k valid prompts with distinct uids, crossing epoch boundaries; a row of the
next epoch whose uid is already in the batch is deferred to the front of the next batch (kept in `pending`), so no
row is skipped. Bad rows are quarantined the first time they are met (once per stream, not per epoch, and not again
after a resume: `state_dict` carries them). Duplicate ids are decided from the id column alone: the first occurrence
in file order wins, whatever its own validity, so the choice does not depend on the shuffle.
"""

from __future__ import annotations

import bisect
import os
from collections import Counter, OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa

from vzero.data import schema as S
from vzero.data.quarantine import QuarantineWriter
from vzero.data.validate import DEFAULT_MAX_PIXELS, DUPLICATE_ID, validate_row
from vzero.records import Prompt

STATE_VERSION = 1


class NotEnoughPromptsError(ValueError):
    """The file has fewer valid (non-duplicate) rows than one batch needs."""


class PromptStream:
    """Shuffled, epoch-aware, resumable stream of validated prompts from `path` (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        seed: int,
        shuffle: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        quarantine: QuarantineWriter | None = None,
        cache_row_groups: int = 4,
    ) -> None:
        if cache_row_groups < 1:
            raise ValueError(f"cache_row_groups must be >= 1, got {cache_row_groups}")
        self.path = os.fspath(path)
        self.seed = seed
        self.shuffle = shuffle
        self.max_pixels = max_pixels
        self.quarantine = quarantine
        self.cache_row_groups = cache_row_groups
        self._file = S.open_dataset(self.path)
        self._columns = S.train_columns_in(self._file.schema_arrow)
        if quarantine is not None:
            quarantine.ensure_schema(pa.schema([self._file.schema_arrow.field(c) for c in self._columns]))

        sizes = [self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)]
        self._group_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_rows = int(self._group_starts[-1])
        ids = self._file.read(columns=[S.ID]).column(S.ID).to_pylist()
        seen: set[Any] = set()
        self._duplicates: set[int] = set()
        for row, uid in enumerate(ids):
            if uid is None:
                continue  # validate_row reports it as missing_field:id
            if uid in seen:
                self._duplicates.add(row)
            seen.add(uid)
        self._candidates = self.num_rows - len(self._duplicates)  # upper bound on valid rows before validation

        self._cache: OrderedDict[int, list[dict[str, Any]]] = OrderedDict()
        self._bad: dict[int, str] = {}  # row -> reason: quarantined, skipped from now on
        self._bad_candidates = 0  # bad rows that are not duplicates (duplicates are already out of _candidates)
        self.reasons: Counter[str] = Counter()
        self.epoch = 0
        self.position = 0  # next index into the epoch's order
        self.pending: list[int] = []  # deferred rows (next epoch), served first
        self.served = 0  # prompts returned so far
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def quarantined(self) -> int:
        return sum(self.reasons.values())

    # ---- order ---------------------------------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row indices in the order epoch `epoch` visits them (a function of seed and epoch only)."""
        if epoch == self._order_epoch:
            return self._order
        groups = np.arange(len(self._group_starts) - 1)
        if not self.shuffle:
            order = np.arange(self.num_rows, dtype=np.int64)
        else:
            rng = np.random.default_rng([self.seed, epoch])
            groups = rng.permutation(groups)
            chunks = []
            for w in range(0, len(groups), self.cache_row_groups):
                window = groups[w : w + self.cache_row_groups]
                rows = np.concatenate(
                    [np.arange(self._group_starts[g], self._group_starts[g + 1]) for g in window]
                ).astype(np.int64)
                chunks.append(rng.permutation(rows))
            order = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)
        self._order_epoch, self._order = epoch, order
        return order

    # ---- batches -------------------------------------------------------------------------------------------------

    def next_batch(self, k: int) -> list[Prompt]:
        """Exactly `k` valid prompts with distinct uids; raises NotEnoughPromptsError if the file can't supply them."""
        if k < 1:
            raise ValueError(f"batch size must be >= 1, got {k}")
        self._check_enough(k)
        batch: list[Prompt] = []
        uids: set[str] = set()
        deferred: list[int] = []
        pending, self.pending = self.pending, []
        while len(batch) < k:
            if pending:
                row = pending.pop(0)
            else:
                order = self.epoch_order(self.epoch)
                if self.position >= len(order):
                    self.epoch += 1
                    self.position = 0
                    self._check_enough(k)
                    continue
                row = int(order[self.position])
                self.position += 1
            prompt = self._prompt(row)
            if prompt is None:
                self._check_enough(k)
                continue
            if prompt.uid in uids:  # same row again, from the next epoch: keep it for the next batch
                deferred.append(row)
                continue
            batch.append(prompt)
            uids.add(prompt.uid)
        self.pending = pending + deferred
        self.served += k
        return batch

    def _check_enough(self, k: int) -> None:
        """Fail as soon as it is certain that k distinct valid rows do not exist."""
        possible = self._candidates - self._bad_candidates
        if k > possible:
            raise NotEnoughPromptsError(
                f"{self.path}: a batch of {k} distinct prompts was requested but at most {possible} of its "
                f"{self.num_rows} rows are usable ({len(self._duplicates)} duplicate ids, "
                f"{self.quarantined} quarantined so far: {dict(self.reasons)}); lower the batch size or add data"
            )

    def _prompt(self, row: int) -> Prompt | None:
        """The row's Prompt, or None after quarantining it (first time) / skipping it (already known bad)."""
        if row in self._bad:
            return None
        raw = self._row(row)
        if row in self._duplicates:
            prompt, reason = None, DUPLICATE_ID
        else:
            prompt, reason = validate_row(raw, max_pixels=self.max_pixels)
        if prompt is None:
            assert reason is not None
            self._bad[row] = reason
            self._bad_candidates += row not in self._duplicates
            self.reasons[reason] += 1
            if self.quarantine is not None:
                self.quarantine.add(raw, reason=reason, row_index=row)
            return None
        return prompt

    def _row(self, row: int) -> dict[str, Any]:
        group = bisect.bisect_right(self._group_starts, row) - 1
        rows = self._cache.get(group)
        if rows is None:
            rows = self._file.read_row_group(group, columns=self._columns).to_pylist()
            self._cache[group] = rows
            while len(self._cache) > self.cache_row_groups:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(group)
        return rows[row - int(self._group_starts[group])]

    # ---- resume --------------------------------------------------------------------------------------------------

    def position_dict(self) -> dict[str, Any]:
        """Where the next batch starts (epoch, position, deferred rows, prompts served): a point to rewind to."""
        return {"epoch": self.epoch, "position": self.position, "pending": list(self.pending), "served": self.served}

    def state_dict(self, position: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything needed to continue exactly here (JSON-serialisable).

        `position` (an earlier `position_dict()`) rewinds the order to that point, e.g. the first batch drawn for a
        step that is not trained yet, while keeping every bad row found since: a stream loaded from it re-draws the
        same batches and quarantines nothing twice."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "cache_row_groups": self.cache_row_groups,
            "num_rows": self.num_rows,
            **(position if position is not None else self.position_dict()),
            "bad_rows": [[row, reason] for row, reason in sorted(self._bad.items())],
            "reasons": dict(self.reasons),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; refuses a state from a different file size or a different order setting."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r} != {STATE_VERSION}")
        for key, mine in (
            ("num_rows", self.num_rows),
            ("seed", self.seed),
            ("shuffle", self.shuffle),
            ("cache_row_groups", self.cache_row_groups),
        ):
            if state[key] != mine:
                raise ValueError(
                    f"{self.path}: stream state has {key}={state[key]!r} but this stream has {mine!r}; "
                    "the order would differ, so resuming is refused"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.pending = [int(r) for r in state["pending"]]
        self.served = int(state["served"])
        self._bad = {int(row): str(reason) for row, reason in state["bad_rows"]}
        self._bad_candidates = sum(1 for row in self._bad if row not in self._duplicates)
        self.reasons = Counter({str(k): int(v) for k, v in state["reasons"].items()})
