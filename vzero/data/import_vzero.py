"""Convert the V-Zero authors' verl-style Parquet files into our dataset schema (`vzero data import-vzero`).

Their rows (verl RLHF layout plus V-Zero's teacher views) look like:
`prompt` (chat messages), `images` (the student's full image), `teacher_images` (the precomputed positive crop),
`teacher_neg_images` (the precomputed negative view), and optionally `data_source`, `extra_info` (a struct with
`index`, ...) and `reward_model` (a struct with `ground_truth`). Accepted liberally:

- `prompt`: a string, a JSON string of a message list, or a list of `{role, content}` messages whose content is a
  string with `<image>` markers or a list of parts (`{type: "text", text}` / `{type: "image"}`). The question is the
  text of the user message(s) with the `<image>` markers removed, whitespace-normalised per line.
- images: a list of `{bytes, path}` structs (HF `Image` feature) or of raw binaries, or a single one. A struct with
  no bytes falls back to reading `path` (absolute, or relative to the source file's folder). Exactly one student
  image is required (our schema has one); precomputed views take the first entry.

Mapping: `id` = `extra_info.index` when present (as a string), else `<file stem>-<row>`; `evidence_box` = the whole
image `[0, 0, W, H]`, because the authors ship precomputed crops and no boxes (the precomputed `pos_image` /
`neg_image` are what the teacher sees; the box only satisfies the schema and makes computed views degrade to the full
image); `answer` = `reward_model.ground_truth` (else `extra_info.answer`) when present, for evaluation only;
`source` = `data_source` when present, else the file stem.

Rows that cannot be converted, fail `validate_row`, or repeat an id already imported are written to the quarantine
file (the source row as it was, with `quarantine_reason`, `quarantine_row`), never dropped silently. Conversion
reasons, on top of those in `vzero.data.validate`:
`import_bad_prompt` (no usable prompt), `import_no_question` (no user text), `import_no_image:<f>`,
`import_multiple_images:images` (more than one student image), `import_image_unreadable:<f>` (no bytes and the path
cannot be read).
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
from vzero.data.quarantine import QuarantineWriter
from vzero.data.validate import DEFAULT_MAX_PIXELS, check_duplicate, validate_row
from vzero.images import image_size

SRC_PROMPT = "prompt"
SRC_IMAGES = "images"
SRC_POS = "teacher_images"
SRC_NEG = "teacher_neg_images"
SRC_REQUIRED = (SRC_PROMPT, SRC_IMAGES)
_IMAGE_MARKER = re.compile(r"<image>")
_READ_BATCH = 64  # source rows per read: bounded memory on large files


class ConversionError(Exception):
    """Internal: a source row that cannot become one of ours; carries the reason code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ImportReport:
    """What an import did; `reasons` counts quarantined rows per reason code."""

    rows: int = 0
    ok: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def quarantined(self) -> int:
        return sum(self.reasons.values())

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "ok": self.ok, "quarantined": self.quarantined, "reasons": dict(self.reasons)}


def import_vzero(
    sources: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    quarantine: str | os.PathLike[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    row_group_size: int = S.DEFAULT_ROW_GROUP_SIZE,
) -> ImportReport:
    """Convert every row of `sources` into `out`; unconvertible rows go to `quarantine`. Streams row batches.

    Raises `DataFileError` if a source is not readable Parquet, lacks `prompt`/`images`, or the sources' schemas
    cannot be unified (then import them one at a time).
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
            row_index = 0
            for batch in pf.iter_batches(batch_size=_READ_BATCH):
                for source_row in batch.to_pylist():
                    report.rows += 1
                    try:
                        row = convert_row(source_row, stem=path.stem, row_index=row_index, base_dir=path.parent)
                        _, reason = validate_row(row, max_pixels=max_pixels)
                        reason = reason or check_duplicate(row[S.ID], seen)
                    except ConversionError as e:
                        reason = e.reason
                    if reason is None:
                        good.write(row)
                        report.ok += 1
                    else:
                        bad.add(source_row, reason=reason, row_index=row_index)
                        report.reasons[reason] += 1
                    row_index += 1
    return report


def convert_row(source_row: dict[str, Any], *, stem: str, row_index: int, base_dir: Path) -> dict[str, Any]:
    """One source row as a row of our schema (not yet validated); raises ConversionError with a reason code."""
    question = question_from_prompt(source_row.get(SRC_PROMPT))
    images = _image_list(source_row.get(SRC_IMAGES), SRC_IMAGES, base_dir)
    if not images:
        raise ConversionError(f"import_no_image:{SRC_IMAGES}")
    if len(images) > 1:
        raise ConversionError(f"import_multiple_images:{SRC_IMAGES}")
    image = images[0]
    try:
        width, height = image_size(image)
    except Exception:  # unreadable header: let validate_row name it (image_undecodable / unsupported)
        width, height = 1, 1
    pos = _image_list(source_row.get(SRC_POS), SRC_POS, base_dir)
    neg = _image_list(source_row.get(SRC_NEG), SRC_NEG, base_dir)
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
        S.POS_IMAGE: pos[0] if pos else None,
        S.NEG_IMAGE: neg[0] if neg else None,
    }


def question_from_prompt(prompt: Any) -> str:
    """The user text of a prompt (string / JSON string / message list), `<image>` markers removed."""
    if prompt is None:
        raise ConversionError("import_bad_prompt")
    if isinstance(prompt, str):
        stripped = prompt.strip()
        if stripped.startswith("["):
            try:
                return question_from_prompt(json.loads(stripped))
            except json.JSONDecodeError:
                pass  # just a string that starts with "["
        return _clean(prompt)
    if isinstance(prompt, dict):
        prompt = [prompt]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise ConversionError("import_bad_prompt")
    texts = [_content_text(m.get("content")) for m in prompt if m.get("role") in (None, "user")]
    return _clean("\n".join(t for t in texts if t))


def _content_text(content: Any) -> str:
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
        return "\n".join(parts)
    raise ConversionError("import_bad_prompt")


def _clean(text: str) -> str:
    lines = (" ".join(_IMAGE_MARKER.sub(" ", line).split()) for line in text.splitlines())
    question = "\n".join(line for line in lines if line)
    if not question:
        raise ConversionError("import_no_question")
    return question


def _image_list(value: Any, field_name: str, base_dir: Path) -> list[bytes]:
    """Encoded image bytes from a list of structs / binaries, or a single one; [] for null or empty."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [_image_bytes(item, field_name, base_dir) for item in items]


def _image_bytes(item: Any, field_name: str, base_dir: Path) -> bytes:
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if isinstance(item, dict):
        data = item.get("bytes")
        if isinstance(data, bytes | bytearray | memoryview) and len(data) > 0:
            return bytes(data)
        path = item.get("path")
        if isinstance(path, str) and path:
            full = Path(path) if Path(path).is_absolute() else base_dir / path
            try:
                return full.read_bytes()
            except OSError as e:
                raise ConversionError(f"import_image_unreadable:{field_name}") from e
    raise ConversionError(f"import_image_unreadable:{field_name}")


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
