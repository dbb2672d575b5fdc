"""Data of the prior-trap experiment: two colour families that differ only in their question, and biased labels.

Every row is a `color` row of the synthetic task (`vzero.data.synth`: one small coloured square among clutter; the
answer is its colour). Half of the rows (alternating by index) keep the control question; the other half get the
TRAP question and `source = "trap"`. Images, answers and difficulty are drawn by the same generator, so the two
families differ only in what a teacher may have learnt to associate with the question.

- `write_colour_rows(path, n, seed)`: `n` such rows (synth rows of the colour family only, in index order).
- `write_biased_labels(src, out, answer, rate, seed)`: a copy of `src` in which a fixed `rate` share of the TRAP rows
  (chosen from the row id with a seeded RNG, whatever the image) carries `answer` instead of its true colour: the
  dataset prior the biased teacher is fine-tuned on. Control rows keep their labels.
- `answer_prior_stats(path, answer)`: the share of each family's labels equal to `answer` (reported with the premises).

The label-free runs read these files through the training stream, which never reads `answer`. Knows nothing about
models or training.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vzero.data import schema as S
from vzero.data.synth import FAMILIES, QUESTION_TEMPLATES, synth_row
from vzero.runtime import derive_seed

CONTROL = "color"
TRAP = "trap"
FAMILY_NAMES = (CONTROL, TRAP)
TRAP_QUESTION = "Which color is the small square?"  # the control asks "What color is the small square?"
DEFAULT_TRAP_ANSWER = "purple"


def is_colour_index(index: int, seed: int) -> bool:
    """Whether synth row `index` of `seed` is a colour row, without drawing it: `synth_row`'s first RNG draw is
    its family (checked against the drawn row in the tests)."""
    return FAMILIES[int(np.random.default_rng([seed, index]).integers(len(FAMILIES)))] == CONTROL


def write_colour_rows(path: str | os.PathLike[str], n: int, seed: int, image_size: int = 336) -> Path:
    """`n` colour rows of synth seed `seed`; every second one (by position) asks the trap question."""
    rows, index = [], 0
    while len(rows) < n:
        if is_colour_index(index, seed):
            row = synth_row(index, seed, image_size)
            assert row[S.SOURCE] == CONTROL and row[S.QUESTION] == QUESTION_TEMPLATES[CONTROL]
            if len(rows) % 2 == 1:
                row = {**row, S.QUESTION: TRAP_QUESTION, S.SOURCE: TRAP}
            rows.append(row)
        index += 1
    with S.DatasetWriter(path) as writer:
        writer.write_all(rows)
    return Path(path)


def biased_ids(ids: list[str], sources: list[str], *, rate: float, seed: int) -> set[str]:
    """The trap rows whose label is replaced: each with probability `rate`, decided by (seed, id) alone."""
    out = set()
    for uid, src in zip(ids, sources, strict=True):
        if src == TRAP and np.random.default_rng(derive_seed(seed, "bias", uid)).random() < rate:
            out.add(uid)
    return out


def write_biased_labels(src: Path, out: Path, *, answer: str, rate: float, seed: int) -> Path:
    """`src` with the labels of `biased_ids` replaced by `answer` (all other columns unchanged)."""
    table = pq.read_table(src)
    ids, sources = table.column(S.ID).to_pylist(), table.column(S.SOURCE).to_pylist()
    chosen = biased_ids(ids, sources, rate=rate, seed=seed)
    answers = [answer if uid in chosen else a for uid, a in zip(ids, table.column(S.ANSWER).to_pylist(), strict=True)]
    table = table.set_column(table.schema.get_field_index(S.ANSWER), S.ANSWER, pa.array(answers, pa.string()))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=S.DEFAULT_ROW_GROUP_SIZE)
    os.replace(tmp, out)
    return out


def answer_prior_stats(path: Path, answer: str) -> dict[str, dict[str, float]]:
    """Per family: rows and the share of labels equal to `answer` (what a teacher fine-tuned on `path` saw)."""
    table = pq.read_table(path, columns=[S.SOURCE, S.ANSWER]).to_pylist()
    out = {}
    for fam in FAMILY_NAMES:
        labels = [r[S.ANSWER] for r in table if r[S.SOURCE] == fam]
        out[fam] = {"rows": len(labels), "share_answer": sum(a == answer for a in labels) / max(1, len(labels))}
    return out
