"""Convert the V-Zero authors' verl-style Parquet files into our dataset schema (`vzero data import-vzero`).

Their columns (their README, "Data Format"; their loader `rl_dataset.py`):
`prompt` (the student's chat messages, `<image>` = the next entry of `images`), `images` (the full image),
`teacher_raw_prompt` (the teacher's chat messages: `<image>` = the full image, `<crop>` = the next entry of
`teacher_images`, a row may hold several), `teacher_images` (the evidence crops), `teacher_neg_raw_prompt`,
`teacher_neg_images` (one negative per crop), `reward_model` (`ground_truth`), `extra_info` (`index`, ...), and
optionally `data_source`. Accepted liberally:

- prompts: a string, a JSON string of a message list, or a list of `{role, content}` messages whose content is a
  string with markers or a list of parts (`{type: "text", text}` / `{type: "image"}` = `<image>`).
- the student's question: the text of the user message(s), markers removed, whitespace-normalised per line.
- the teacher's template (`teacher_prompt`): the ONE user message of `teacher_raw_prompt`, verbatim (wording,
  whitespace and the order of `<image>` / `<crop>` kept); the teacher builds its prompt from it (vzero.teacher_prompt).
- images: every form in `vzero.data.image_sources` (bytes, paths, `file:`, base64, `{"image": ...}` dicts with
  their own `min_pixels` / `max_pixels`); remote URLs and paths leaving the data root are refused with a reason.

Mapping: `id` = `extra_info.index` when present (as a string), else `<file stem>-<row>`; `evidence_box` = the whole
image `[0, 0, W, H]`, because the authors ship precomputed crops and no boxes (the crops are what the teacher sees);
`pos_images` / `neg_images` = ALL of `teacher_images` / `teacher_neg_images`, in order; `answer` =
`reward_model.ground_truth` (else `extra_info.answer`) when present, for evaluation only; `source` = `data_source`
when present, else the file stem. The negative replay uses `teacher_raw_prompt` with the crops swapped, as the
authors' loader does (it rebuilds `teacher_neg_raw_prompt` that way and never reads the column's own text): a
`teacher_neg_raw_prompt` that differs from `teacher_raw_prompt` is counted in the report's notes, not used.

Nothing is truncated: a row whose crops do not match its markers is quarantined. Rows that cannot be converted, fail
`validate_row`, or repeat an id already imported are written to the quarantine file (the source row as it was, with
`quarantine_reason`, `quarantine_row`), never dropped silently. Conversion reasons, on top of those in
`vzero.data.validate` and `vzero.data.image_sources`:
`import_bad_prompt` (no usable student prompt), `import_no_question` (no user text), `import_no_image:<f>`,
`import_multiple_images:images` (more than one student image), `import_bad_prompt:teacher_raw_prompt` (not exactly
one user message of text and markers), `import_no_crop:teacher_raw_prompt` (no `<crop>` marker),
`import_image_count:teacher_raw_prompt` (more `<image>` markers than student images), `import_crop_count:<f>` (the
number of `teacher_images` / `teacher_neg_images` differs from the number of `<crop>` markers: one crop per marker;
without `teacher_raw_prompt`, at most one crop). Report notes (rows still imported): `system_turn_dropped` (a system
message: the system prompt is a per-model option, `chat.system_prompt`), `teacher_neg_raw_prompt_ignored`,
`image_resized_to_own_budget`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vzero.data import schema as S
from vzero.data.image_sources import ImageSourceError, ImageSources
from vzero.data.quarantine import QuarantineWriter
from vzero.data.validate import DEFAULT_MAX_PIXELS, check_duplicate, validate_row
from vzero.images import image_size
from vzero.teacher_prompt import CROP, IMAGE, count_markers

SRC_PROMPT = "prompt"
SRC_IMAGES = "images"
SRC_TEACHER_PROMPT = "teacher_raw_prompt"
SRC_POS = "teacher_images"
SRC_NEG_PROMPT = "teacher_neg_raw_prompt"
SRC_NEG = "teacher_neg_images"
SRC_REQUIRED = (SRC_PROMPT, SRC_IMAGES)
SYSTEM_DROPPED = "system_turn_dropped"
NEG_PROMPT_IGNORED = "teacher_neg_raw_prompt_ignored"
_MARKER_TEXT = re.compile(f"{re.escape(IMAGE)}|{re.escape(CROP)}")
_READ_BATCH = 64  # source rows per read: bounded memory on large files


class ConversionError(Exception):
    """Internal: a source row that cannot become one of ours; carries the reason code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ImportReport:
    """What an import did; `reasons` counts quarantined rows per reason code, `notes` what was done to kept rows."""

    rows: int = 0
    ok: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)

    @property
    def quarantined(self) -> int:
        return sum(self.reasons.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "ok": self.ok,
            "quarantined": self.quarantined,
            "reasons": dict(self.reasons),
            "notes": dict(self.notes),
        }


def import_vzero(
    sources: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    quarantine: str | os.PathLike[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    data_root: str | os.PathLike[str] | None = None,
    row_group_size: int = S.DEFAULT_ROW_GROUP_SIZE,
) -> ImportReport:
    """Convert every row of `sources` into `out`; unconvertible rows go to `quarantine`. Streams row batches.

    `data_root`: where relative image paths start and what no image path may leave (default: each source file's
    folder). Raises `DataFileError` if a source is not readable Parquet, lacks `prompt`/`images`, or the sources'
    schemas cannot be unified (then import them one at a time).
    """
    if not sources:
        raise ValueError("import-vzero needs at least one source file")
    files = [_open_source(src) for src in sources]
    try:
        union = pa.unify_schemas([f.schema_arrow for f in files], promote_options="permissive")
    except (pa.ArrowException, TypeError) as e:
        raise S.DataFileError(f"source schemas cannot be unified ({e}); import the files one at a time") from e
    report = ImportReport()
    seen: set[str] = set()
    with QuarantineWriter(quarantine, union) as bad, S.DatasetWriter(out, row_group_size=row_group_size) as good:
        for src, pf in zip(sources, files, strict=True):
            path = Path(src)
            where = ImageSources(Path(data_root) if data_root is not None else path.parent, max_pixels)
            row_index = 0
            for batch in pf.iter_batches(batch_size=_READ_BATCH):
                for source_row in batch.to_pylist():
                    report.rows += 1
                    where.notes.clear()
                    try:
                        row = convert_row(source_row, stem=path.stem, row_index=row_index, images=where)
                        _, reason = validate_row(row, max_pixels=max_pixels)
                        reason = reason or check_duplicate(row[S.ID], seen)
                    except ConversionError as e:
                        reason = e.reason
                    if reason is None:
                        good.write(row)
                        report.ok += 1
                        report.notes.update(where.notes)
                    else:
                        bad.add(source_row, reason=reason, row_index=row_index)
                        report.reasons[reason] += 1
                    row_index += 1
    return report


def convert_row(source_row: dict[str, Any], *, stem: str, row_index: int, images: ImageSources) -> dict[str, Any]:
    """One source row as a row of our schema (not yet validated); raises ConversionError with a reason code.

    What was done along the way (a dropped system turn, resized images) is appended to `images.notes`."""
    prompt = _messages(source_row.get(SRC_PROMPT), "import_bad_prompt")
    if _has_system(prompt):
        images.notes.append(SYSTEM_DROPPED)
    question = question_from_prompt(prompt)
    try:
        full = images.images(source_row.get(SRC_IMAGES), SRC_IMAGES)
        pos = images.images(source_row.get(SRC_POS), SRC_POS)
        neg = images.images(source_row.get(SRC_NEG), SRC_NEG)
    except ImageSourceError as e:
        raise ConversionError(e.reason) from e
    if not full:
        raise ConversionError(f"import_no_image:{SRC_IMAGES}")
    if len(full) > 1:
        raise ConversionError(f"import_multiple_images:{SRC_IMAGES}")
    template = _teacher_template(source_row, images.notes)
    _check_crops(template, len(full), len(pos), len(neg))
    image = full[0]
    try:
        width, height = image_size(image)
    except Exception:  # unreadable header: let validate_row name it (image_undecodable / unsupported)
        width, height = 1, 1
    extra = source_row.get("extra_info") if isinstance(source_row.get("extra_info"), dict) else {}
    reward = source_row.get("reward_model") if isinstance(source_row.get("reward_model"), dict) else {}
    index = extra.get("index")
    answer = reward.get("ground_truth", extra.get("answer"))
    source = source_row.get("data_source")
    return {
        S.ID: str(index) if index is not None else f"{stem}-{row_index}",
        S.IMAGE: image,
        S.QUESTION: question,
        S.EVIDENCE_BOX: [0.0, 0.0, float(width), float(height)],
        S.NEGATIVE_BOX: None,
        S.ANSWER: None if answer is None else (answer if isinstance(answer, str) else json.dumps(answer)),
        S.SOURCE: source if isinstance(source, str) else stem,
        S.POS_IMAGES: pos or None,
        S.NEG_IMAGES: neg or None,
        S.TEACHER_PROMPT: template,
    }


def question_from_prompt(prompt: Any) -> str:
    """The user text of a prompt (string / JSON string / message list), `<image>` markers removed."""
    messages = _messages(prompt, "import_bad_prompt")
    if isinstance(messages, str):
        return _clean(messages)
    users = [m for m in messages if m.get("role") in (None, "user")]
    texts = [_content_text(m.get("content"), "import_bad_prompt", sep="\n") for m in users]
    return _clean("\n".join(t for t in texts if t))


def template_from_prompt(prompt: Any) -> str:
    """The teacher template of a `teacher_raw_prompt`: its one user message, verbatim (markers kept)."""
    reason = f"import_bad_prompt:{SRC_TEACHER_PROMPT}"
    messages = _messages(prompt, reason)
    if isinstance(messages, str):
        return messages
    users = [m for m in messages if m.get("role") in (None, "user")]
    if len(users) != 1:
        raise ConversionError(reason)
    return _content_text(users[0].get("content"), reason, sep="")  # parts render back to back


def _teacher_template(source_row: dict[str, Any], notes: list[str]) -> str | None:
    raw = source_row.get(SRC_TEACHER_PROMPT)
    if raw is None:
        return None
    messages = _messages(raw, f"import_bad_prompt:{SRC_TEACHER_PROMPT}")
    if _has_system(messages):
        notes.append(SYSTEM_DROPPED)
    template = template_from_prompt(messages)
    neg_raw = source_row.get(SRC_NEG_PROMPT)
    if neg_raw is not None and neg_raw != raw:
        notes.append(NEG_PROMPT_IGNORED)
    return template


def _check_crops(template: str | None, num_full: int, num_pos: int, num_neg: int) -> None:
    """One crop (and none or one negative) per `<crop>` marker; without a template, at most one crop."""
    if template is None:
        crops = 1  # the config's template has one <crop>
        if num_pos > 1:
            raise ConversionError(f"import_crop_count:{SRC_POS}")
    else:
        full_markers, crops = count_markers(template)
        if crops == 0:
            raise ConversionError(f"import_no_crop:{SRC_TEACHER_PROMPT}")
        if full_markers > num_full:
            raise ConversionError(f"import_image_count:{SRC_TEACHER_PROMPT}")
        if num_pos != crops:
            raise ConversionError(f"import_crop_count:{SRC_POS}")
    if num_neg not in (0, crops):
        raise ConversionError(f"import_crop_count:{SRC_NEG}")


def _messages(prompt: Any, reason: str) -> str | list[dict[str, Any]]:
    """A prompt as a plain string or a list of message dicts (JSON strings of message lists are parsed)."""
    if prompt is None:
        raise ConversionError(reason)
    if isinstance(prompt, str):
        stripped = prompt.strip()
        if stripped.startswith("["):
            try:
                return _messages(json.loads(stripped), reason)
            except json.JSONDecodeError:
                pass  # just a string that starts with "["
        return prompt
    if isinstance(prompt, dict):
        prompt = [prompt]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise ConversionError(reason)
    return prompt


def _has_system(messages: str | list[dict[str, Any]]) -> bool:
    return not isinstance(messages, str) and any(m.get("role") == "system" for m in messages)


def _content_text(content: Any, reason: str, *, sep: str) -> str:
    """A message's content as text with markers: string content as it is; parts joined by `sep`, image parts as
    `<image>`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") == "image" and part.get("image") is None:
                parts.append(IMAGE)
            else:  # an inline image payload or another modality: not something we can keep
                raise ConversionError(reason)
        return sep.join(parts)
    raise ConversionError(reason)


def _clean(text: str) -> str:
    lines = (" ".join(_MARKER_TEXT.sub(" ", line).split()) for line in text.splitlines())
    question = "\n".join(line for line in lines if line)
    if not question:
        raise ConversionError("import_no_question")
    return question


def _open_source(src: str | os.PathLike[str]) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(src)
    except (OSError, pa.ArrowException) as e:
        raise S.DataFileError(f"{src}: cannot read as Parquet ({e})") from e
    missing = [c for c in SRC_REQUIRED if c not in pf.schema_arrow.names]
    if missing:
        raise S.DataFileError(
            f"{src}: not a verl/V-Zero file: column(s) {missing} missing (has {pf.schema_arrow.names})"
        )
    return pf
