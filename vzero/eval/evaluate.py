"""Evaluate a model on a labelled Parquet file: greedy answers, exact match after normalisation, per-source accuracy.

THE ONLY module that reads the `answer` column. Training never does (the data stream projects it away); the toy
recipe's supervised teacher gets its labels through `iter_labeled` here, so there is one reader to audit.

Contract of `evaluate(model_dir, data_path, views=..., engine=...)`:
- rows are read in file order (the first `limit` rows if given) and validated exactly like training rows
  (`vzero.data.validate.validate_row`, first id wins on duplicates) plus the label itself (`missing_field:answer`,
  `wrong_type:answer`, `answer_empty`). Invalid rows are counted by reason in `invalid_reasons`, never silently
  dropped; accuracy is over the rows that were evaluated (`evaluated = rows - invalid`).
- the prompt is the training chat prompt (`chat_prompt_ids`, with the model's template options `chat`: no system
  turn and thinking off by default, as the authors train) with ONE image: the full image (`views="full"`, what the
  student sees) or the evidence crop (`views="crop"`: the positive view the teacher sees: `pos_images[0]` when the row
  carries one, else `positive_view(image, evidence_box, margin)`), at the given pixel budget (default: the model
  directory's own processor budget).
- decoding is greedy (temperature 0, n = 1) through the project's engines (`auto` = vLLM where installed).
- scoring: `normalize_answer` = lowercase, punctuation replaced by spaces, first whitespace-separated word;
  a prediction is correct iff its normalised form equals the normalised answer. Rows without `source` are reported
  under "unknown".

Knows nothing about Ray or training.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from vzero.config import ChatOptions, EngineKind, ModelSource, VLLMOptions
from vzero.data import schema as S
from vzero.data.validate import (
    DEFAULT_MAX_PIXELS,
    DUPLICATE_ID,
    check_duplicate,
    missing_field,
    validate_row,
    wrong_type,
)
from vzero.engines import GenerateRequest, SamplingSpec, create_engine
from vzero.images import decode_rgb
from vzero.records import Prompt
from vzero.views import DEFAULT_MARGIN, positive_view, resize_to_budget
from vzero.vlm_inputs import chat_prompt_ids

ViewKind = Literal["full", "crop"]
ANSWER_EMPTY = "answer_empty"
UNKNOWN_SOURCE = "unknown"
_READ_BATCH = 64  # rows per Parquet read
_PUNCT = re.compile(r"[^\w\s]|_")  # anything that is not a letter, digit or space (underscore counts as punctuation)


@dataclass(frozen=True)
class LabeledRow:
    """A validated row and its gold answer."""

    prompt: Prompt
    answer: str


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation -> space, first word ("" if none): "Red." -> "red", " (7) apples" -> "7"."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return words[0] if words else ""


def iter_labeled(
    path: str | Path, *, limit: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[LabeledRow | str]:
    """Rows of `path` in file order: a `LabeledRow` for a usable row, else its reason code (see module docstring)."""
    pf = S.open_dataset(path)
    if S.ANSWER not in pf.schema_arrow.names:
        raise S.DataFileError(f"{path}: no {S.ANSWER!r} column, so there is nothing to evaluate against")
    seen: set[str] = set()
    count = 0
    try:
        for batch in pf.iter_batches(batch_size=_READ_BATCH):
            for raw in batch.to_pylist():
                if limit is not None and count >= limit:
                    return
                count += 1
                prompt, reason = validate_row(raw, max_pixels=max_pixels)
                if prompt is not None:
                    reason = check_duplicate(prompt.uid, seen) or _answer_problem(raw.get(S.ANSWER))
                yield reason if prompt is None or reason is not None else LabeledRow(prompt, raw[S.ANSWER])
    except (OSError, pa.ArrowException) as e:
        raise S.DataFileError(f"{path}: data pages unreadable ({e})") from e


def read_answers(path: str | Path) -> tuple[dict[str, str], Counter[str]]:
    """`id -> answer` of a labels file: any Parquet with `id` and `answer` columns (nothing else is read).

    For evaluation tools that score logged samples (`vzero regate --labels`). Rows without a usable answer or id
    are counted by reason in the second value (`missing_field:id`, `missing_field:answer`, `wrong_type:answer`,
    `answer_empty`, `duplicate_id`: the first id wins); a file that is not Parquet or lacks either column raises
    `DataFileError` naming the file and its columns."""
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise S.DataFileError(f"{path}: cannot read as Parquet ({e})") from e
    missing = [c for c in (S.ID, S.ANSWER) if c not in pf.schema_arrow.names]
    if missing:
        raise S.DataFileError(f"{path}: labels need columns {missing} (file has {pf.schema_arrow.names})")
    answers: dict[str, str] = {}
    invalid: Counter[str] = Counter()
    try:
        for batch in pf.iter_batches(batch_size=4096, columns=[S.ID, S.ANSWER]):
            for raw in batch.to_pylist():
                uid = raw[S.ID]
                reason = missing_field(S.ID) if not isinstance(uid, str) else _answer_problem(raw[S.ANSWER])
                if reason is None and uid in answers:
                    reason = DUPLICATE_ID
                if reason is not None:
                    invalid[reason] += 1
                else:
                    answers[uid] = raw[S.ANSWER]
    except (OSError, pa.ArrowException) as e:
        raise S.DataFileError(f"{path}: data pages unreadable ({e})") from e
    return answers, invalid


def _answer_problem(answer: Any) -> str | None:
    if answer is None:
        return missing_field(S.ANSWER)
    if not isinstance(answer, str):
        return wrong_type(S.ANSWER)
    return ANSWER_EMPTY if not normalize_answer(answer) else None


def score(predictions: Sequence[str], answers: Sequence[str], sources: Sequence[str | None]) -> dict[str, Any]:
    """Exact match after `normalize_answer`, overall and per source: {accuracy, correct, evaluated, by_source}."""
    if not len(predictions) == len(answers) == len(sources):
        raise ValueError(f"lengths differ: {len(predictions)} predictions, {len(answers)} answers, {len(sources)}")
    hits: dict[str, list[int]] = {}
    for pred, gold, src in zip(predictions, answers, sources, strict=True):
        bucket = hits.setdefault(src if src is not None else UNKNOWN_SOURCE, [0, 0])
        bucket[0] += normalize_answer(pred) == normalize_answer(gold)
        bucket[1] += 1
    correct, evaluated = sum(h[0] for h in hits.values()), sum(h[1] for h in hits.values())
    return {
        "accuracy": correct / evaluated if evaluated else 0.0,
        "correct": correct,
        "evaluated": evaluated,
        "by_source": {src: {"accuracy": c / n, "correct": c, "evaluated": n} for src, (c, n) in sorted(hits.items())},
    }


def eval_image(prompt: Prompt, views: ViewKind, *, margin: float, max_pixels: int) -> Image.Image:
    """The image the model answers from: the full image, or the teacher's positive view (evidence crop)."""
    if views == "full":
        return decode_rgb(prompt.image)
    if views != "crop":
        raise ValueError(f"views must be 'full' or 'crop', got {views!r}")
    if prompt.pos_images:  # precomputed crops (imported rows): the first, as the only one a one-image prompt shows
        return resize_to_budget(decode_rgb(prompt.pos_images[0]), max_pixels=max_pixels)
    return positive_view(decode_rgb(prompt.image), prompt.evidence_box, margin=margin, max_pixels=max_pixels)


def model_pixel_budget(model_dir: str | Path) -> tuple[int, int]:
    """(min_pixels, max_pixels) of the directory's own image processor."""
    from vzero.models.loading import load_processor

    size = dict(load_processor(model_dir).image_processor.size)
    return int(size["shortest_edge"]), int(size["longest_edge"])


def evaluate(
    model_dir: str | Path,
    data_path: str | Path,
    *,
    views: ViewKind = "full",
    engine: EngineKind = "auto",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    limit: int | None = None,
    margin: float = DEFAULT_MARGIN,
    max_tokens: int = 16,
    device: str | None = None,
    chat: ChatOptions | None = None,
    batch_size: int = 32,
    chunk: int = 256,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Greedy-decode every valid row and score it; returns the summary dict (see module docstring)."""
    t0 = time.perf_counter()
    own_min, own_max = model_pixel_budget(model_dir)
    min_pixels, max_pixels = min_pixels or own_min, max_pixels or own_max
    min_pixels = min(min_pixels, max_pixels)  # a budget given as max only must not fall below the model's minimum
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = ModelSource(path=str(model_dir), min_pixels=min_pixels, max_pixels=max_pixels, chat=chat or ChatOptions())
    eng = create_engine(engine, source, device=device, vllm=VLLMOptions(max_model_len=2048), batch_size=batch_size)
    greedy = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0)
    invalid: Counter[str] = Counter()
    preds: list[str] = []
    golds: list[LabeledRow] = []
    rows = 0

    def flush(pending: list[LabeledRow]) -> None:
        requests = [
            GenerateRequest(
                chat_prompt_ids(eng.tokenizer, r.prompt.question, source.chat),
                [eval_image(r.prompt, views, margin=margin, max_pixels=max_pixels)],
            )
            for r in pending
        ]
        for group in eng.generate(requests, greedy):
            preds.append(eng.tokenizer.decode(group[0].response_ids, skip_special_tokens=True))
        golds.extend(pending)

    try:
        pending: list[LabeledRow] = []
        for item in iter_labeled(data_path, limit=limit):
            rows += 1
            if isinstance(item, str):
                invalid[item] += 1
                continue
            pending.append(item)
            if len(pending) >= chunk:
                flush(pending)
                pending = []
        if pending:
            flush(pending)
    finally:
        eng.close()
    result = {
        "model": str(model_dir),
        "data": str(data_path),
        "views": views,
        "engine": eng.name,
        **score(preds, [g.answer for g in golds], [g.prompt.source for g in golds]),
        "rows": rows,
        "invalid": sum(invalid.values()),
        "invalid_reasons": dict(sorted(invalid.items())),
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "max_tokens": max_tokens,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if return_predictions:
        result["predictions"] = [
            {"id": g.prompt.uid, "source": g.prompt.source, "answer": g.answer, "prediction": p}
            for g, p in zip(golds, preds, strict=True)
        ]
    return result
