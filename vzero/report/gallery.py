"""The gallery's content: for chosen steps, prompts with their images, both teacher views and decoded responses.

Prompts are looked up by id in the run's data file (training columns only: `answer` is never read) and validated with
the stream's `validate_row`; the views are rebuilt with `vzero.views.views_for` exactly as the gating actor builds
them (negative mode, margin, the teacher's pixel budget, downsample factor, view seed from the run's config; the
first crop of a row with several). Tokens
are decoded one by one with the student's tokenizer (tokenizer.json from the run's checkpoint, else student.path);
each keeps Δ = lp_pos - lp_neg and, at gate level token, its own weight. Knows nothing about HTML.
"""

from __future__ import annotations

import bisect
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from vzero.data import schema as S
from vzero.data.validate import validate_row
from vzero.images import decode_rgb
from vzero.records import Prompt
from vzero.report.load import RunData, read_trajectories
from vzero.views import HARD_NEGATIVE, expand_box, hard_negative_box, views_for

FULL_IMAGE_SIDE = 448  # px: the full image is shown at most this large (views keep their own size)
EVIDENCE_COLOUR, NEGATIVE_COLOUR = (22, 163, 74), (220, 38, 38)


@dataclass
class Token:
    id: int
    text: str
    delta: float  # lp_pos - lp_neg
    lp_pos: float
    lp_neg: float
    weight: float | None  # token gate weight (gate level token), else None
    special: bool


@dataclass
class Response:
    sample_index: int
    weight: float
    finish_reason: str
    tokens: list[Token]
    text: str

    @property
    def mean_delta(self) -> float:
        return float(np.mean([t.delta for t in self.tokens])) if self.tokens else 0.0


@dataclass
class GalleryPrompt:
    step: int
    uid: str
    question: str | None  # None when the data file could not be read
    source: str | None
    negative_mode: str
    images: dict[str, bytes]  # "full" / "positive" / "negative" -> PNG
    responses: list[Response]
    notes: list[str] = field(default_factory=list)
    boxes: str = ""  # what the boxes drawn on the full image mean


class Detokenizer:
    """Token ids -> text pieces with the run's tokenizer.json (`tokenizers`, no model code)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def pieces(self, ids: list[int]) -> list[str]:
        """The text each token adds. Byte-level BPE splits some characters over tokens, so each piece is the
        difference of two decodes of a short window (the way streaming detokenizers do it)."""
        out = []
        for i in range(len(ids)):
            lo = max(0, i - 4)
            prev = self.tok.decode(ids[lo:i], skip_special_tokens=False)
            cur = self.tok.decode(ids[lo : i + 1], skip_special_tokens=False)
            out.append(cur[len(prev) :] if cur.startswith(prev) else (self.tok.id_to_token(ids[i]) or ""))
        return out

    def text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def find_tokenizer(run: RunData) -> Path | None:
    """tokenizer.json of the run's newest checkpoint (inside the run dir), else of the student's model directory."""
    candidates = []
    if run.checkpoint is not None:
        candidates.append(run.checkpoint / "model")
    student = run.resolve(str(run.setting("student.path")))
    if student is not None:
        candidates.append(student)
    return next((c / "tokenizer.json" for c in candidates if (c / "tokenizer.json").is_file()), None)


def load_prompts(path: Path, uids: set[str], *, max_pixels: int) -> tuple[dict[str, Prompt], dict[str, str]]:
    """(uid -> Prompt, uid -> reason) for the rows with these ids (first occurrence), reading only their row
    groups. Raises S.DataFileError if the file is unusable."""
    pf = S.open_dataset(path)
    ids = pf.read(columns=[S.ID]).column(S.ID).to_pylist()
    rows: dict[str, int] = {}
    for i, uid in enumerate(ids):
        if uid in uids and uid not in rows:
            rows[uid] = i
    starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]).tolist()
    columns = S.train_columns_in(pf.schema_arrow)
    prompts, reasons = {}, {uid: "id not found in the data file" for uid in uids - set(rows)}
    by_group: dict[int, list[str]] = {}
    for uid, row in rows.items():
        by_group.setdefault(bisect.bisect_right(starts, row) - 1, []).append(uid)
    for group, members in by_group.items():
        table = pf.read_row_group(group, columns=columns).to_pylist()
        for uid in members:
            prompt, reason = validate_row(table[rows[uid] - starts[group]], max_pixels=max_pixels)
            if prompt is None:
                reasons[uid] = f"row is invalid ({reason})"
            else:
                prompts[uid] = prompt
    return prompts, reasons


def pick_prompts(table: pa.Table, k: int) -> list[str]:
    """The k prompts whose samples differ most in mean Δ (where the gate has most to say), ties by uid."""
    spread: dict[str, list[float]] = {}
    for uid, pos, neg in zip(
        table.column("uid").to_pylist(),
        table.column("lp_pos").to_pylist(),
        table.column("lp_neg").to_pylist(),
        strict=True,
    ):
        d = np.asarray(pos, dtype=np.float64) - np.asarray(neg, dtype=np.float64)
        spread.setdefault(uid, []).append(float(d.mean()) if d.size else 0.0)
    ranked = sorted(spread, key=lambda u: (-(max(spread[u]) - min(spread[u])), u))
    return ranked[:k]


def build_gallery(run: RunData, steps: list[int], per_step: int) -> tuple[list[GalleryPrompt], list[str]]:
    """Gallery items for `steps` (metrics step numbers), `per_step` prompts each; plus notes on what is missing."""
    notes: list[str] = []
    tables = {}
    for s in steps:
        path = run.trajectory_files.get(s)
        if path is None:
            notes.append(f"step {s}: no trajectories file")
            continue
        table = read_trajectories(path, notes)
        if table is not None and table.num_rows:
            tables[s] = table
    chosen = {s: pick_prompts(t, per_step) for s, t in tables.items()}
    prompts, reasons = _prompts_for(run, {u for us in chosen.values() for u in us}, notes)
    detok = None
    tok_path = find_tokenizer(run)
    if tok_path is None:
        notes.append("no tokenizer.json in the run's checkpoints or student.path: tokens are shown as ids")
    else:
        detok = Detokenizer(tok_path)
    items = []
    for s, uids in chosen.items():
        rows = tables[s].to_pylist()
        for uid in uids:
            group = sorted((r for r in rows if r["uid"] == uid), key=lambda r: r["sample_index"])
            items.append(_item(run, s, uid, group, prompts.get(uid), reasons.get(uid), detok))
    return items, notes


def _prompts_for(run: RunData, uids: set[str], notes: list[str]) -> tuple[dict[str, Prompt], dict[str, str]]:
    if not uids:
        return {}, {}
    configured = str(run.setting("data.path"))
    path = run.resolve(configured)
    if path is None:
        notes.append(f"data file {configured!r} not found from here: the gallery shows no images or questions")
        return {}, {u: "data file not found" for u in uids}
    try:
        return load_prompts(path, uids, max_pixels=int(run.setting("data.max_image_pixels")))
    except S.DataFileError as e:
        notes.append(f"data file unusable ({e}): the gallery shows no images or questions")
        return {}, {u: "data file unusable" for u in uids}


def _item(
    run: RunData,
    step: int,
    uid: str,
    group: list[dict[str, Any]],
    prompt: Prompt | None,
    reason: str | None,
    detok: Detokenizer | None,
) -> GalleryPrompt:
    mode = group[0].get("negative_mode") or str(run.setting("views.negative_mode"))
    item = GalleryPrompt(step, uid, None, None, mode, {}, [_response(r, detok) for r in group])
    if prompt is None:
        item.notes.append(f"no images: {reason}")
        return item
    item.question, item.source = prompt.question, prompt.source
    views = views_for(
        prompt,
        mode=str(run.setting("views.negative_mode")),
        margin=float(run.setting("views.margin")),
        min_pixels=int(run.teacher_setting("min_pixels")),
        max_pixels=int(run.teacher_setting("max_pixels")),
        factor=float(run.setting("views.downsample_factor")),
        seed=int(run.setting("views.seed")),
    )
    pos, neg, used = views.pos[0], views.neg[0], views.mode_used
    if len(views.pos) > 1:
        item.notes.append(f"{len(views.pos)} evidence crops; the first and its negative are shown")
    if used != mode:
        item.notes.append(f"views rebuilt with negative mode {used!r}, but the run recorded {mode!r}")
    full, item.boxes = _annotated(decode_rgb(prompt.image), prompt, used, run)
    item.images = {"full": png(full), "positive": png(pos), "negative": png(neg)}
    return item


def _response(row: dict[str, Any], detok: Detokenizer | None) -> Response:
    ids = row["response_ids"] or []
    pos, neg = row.get("lp_pos") or [], row.get("lp_neg") or []
    tw = row.get("token_weights")
    texts = detok.pieces(ids) if detok else [f"[{i}]" for i in ids]
    tokens = [
        Token(
            id=int(ids[i]),
            text=texts[i],
            delta=float(pos[i] - neg[i]) if i < min(len(pos), len(neg)) else math.nan,
            lp_pos=float(pos[i]) if i < len(pos) else math.nan,
            lp_neg=float(neg[i]) if i < len(neg) else math.nan,
            weight=float(tw[i]) if tw and i < len(tw) else None,
            special=bool(detok and ids[i] in detok.special),
        )
        for i in range(len(ids))
    ]
    text = detok.text(ids) if detok else " ".join(map(str, ids))
    weight = row.get("weight")
    return Response(
        sample_index=int(row["sample_index"]),
        weight=float(weight) if weight is not None else math.nan,
        finish_reason=str(row.get("finish_reason") or ""),
        tokens=tokens,
        text=text,
    )


def _annotated(full: Image.Image, prompt: Prompt, mode_used: str, run: RunData) -> tuple[Image.Image, str]:
    """The full image with the positive view's region (green) and, when it is a crop of it, the negative's (red);
    plus a caption saying which boxes were drawn."""
    img = full.copy()
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 150))
    margin = float(run.setting("views.margin"))
    pos_box = prompt.evidence_box if prompt.pos_images else expand_box(prompt.evidence_box, margin, img.size)
    draw.rectangle(pos_box, outline=EVIDENCE_COLOUR, width=width)
    caption = "green: the evidence box" if prompt.pos_images else "green: the positive view's region"
    neg_box = None
    if mode_used == HARD_NEGATIVE:
        neg_box = (
            expand_box(prompt.negative_box, margin, img.size)
            if prompt.negative_box is not None
            else hard_negative_box(
                prompt.evidence_box, margin=margin, size=img.size, seed=int(run.setting("views.seed")), uid=prompt.uid
            )
        )
    if neg_box is not None:
        draw.rectangle(neg_box, outline=NEGATIVE_COLOUR, width=width)
        caption += "; red: the negative crop's"
    scale = FULL_IMAGE_SIDE / max(img.size)
    if scale < 1:
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS
        )
    return img, caption


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
