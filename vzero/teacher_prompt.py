"""The teacher's user turn: a template with image markers, turned into chat parts and the order of its images.

Markers (the authors' `teacher_raw_prompt` convention; their launcher: "teacher prompt uses <image> for
DATA_IMAGE_KEY and <crop> for TEACHER_CROP_IMAGE_KEY"):
- `<image>`: the FULL image (the student's view), shown at the teacher's pixel budget;
- `<crop>`: the row's next evidence crop, in order (a row may hold several; the i-th marker is the i-th crop);
- `{question}`: the row's question, in a config template only (`teacher.prompt_template`); a row's own template
  (`teacher_prompt` column) already holds its wording and is used verbatim.
Text between markers is kept as it is (whitespace included). The negative replay uses the SAME parts with every crop
swapped for its negative and the full image kept: only the evidence differs between the two passes (the authors'
loader builds their negative prompt the same way). `context="crop"` drops the `<image>` markers: the crop-only
variant, whose prompt for the default template is exactly the student's layout (one image, then the question).

Knows nothing about models, tokens or files.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

IMAGE = "<image>"
CROP = "<crop>"
QUESTION = "{question}"
DEFAULT_TEMPLATE = IMAGE + CROP + QUESTION  # no wording of ours: the full image, the crop, the question
Context = Literal["crop", "full_and_crop"]
CONTEXTS: tuple[Context, ...] = ("crop", "full_and_crop")
_MARKERS = re.compile(f"({re.escape(IMAGE)}|{re.escape(CROP)})")
T = TypeVar("T")


def count_markers(template: str) -> tuple[int, int]:
    """(number of `<image>`, number of `<crop>`) markers in `template`."""
    return template.count(IMAGE), template.count(CROP)


@dataclass(frozen=True)
class TeacherPrompt:
    """A teacher user turn as chat-template content parts, and which image each image part stands for."""

    parts: list[dict[str, Any]]  # HF chat parts: {"type": "image"} / {"type": "text", "text": ...}
    slots: tuple[Literal["image", "crop"], ...]  # per image part, in order

    @property
    def num_crops(self) -> int:
        return sum(1 for s in self.slots if s == "crop")

    def images(self, full: T | None, crops: Sequence[T]) -> list[T]:
        """The request's images in part order: `full` for `<image>`, the i-th of `crops` for the i-th `<crop>`."""
        if len(crops) != self.num_crops:
            raise ValueError(f"the teacher prompt holds {self.num_crops} <crop> marker(s) but {len(crops)} crop(s)")
        if "image" in self.slots and full is None:
            raise ValueError("the teacher prompt holds <image> but no full image was given")
        it = iter(crops)
        return [full if s == "image" else next(it) for s in self.slots]  # type: ignore[misc]


def teacher_prompt(template: str, *, context: Context, question: str | None = None) -> TeacherPrompt:
    """Parse `template` into parts; `question` fills `{question}` (config templates); `crop` drops `<image>`."""
    if context not in CONTEXTS:
        raise ValueError(f"unknown teacher context {context!r}; choose one of {CONTEXTS}")
    if question is not None:
        template = template.replace(QUESTION, question)
    parts: list[dict[str, Any]] = []
    slots: list[Literal["image", "crop"]] = []
    for segment in _MARKERS.split(template):
        if segment == IMAGE:
            if context == "full_and_crop":
                parts.append({"type": "image"})
                slots.append("image")
        elif segment == CROP:
            parts.append({"type": "image"})
            slots.append("crop")
        elif segment:
            parts.append({"type": "text", "text": segment})
    if "crop" not in slots:
        raise ValueError(f"a teacher prompt needs at least one {CROP} marker (the evidence): {template[:80]!r}")
    return TeacherPrompt(parts, tuple(slots))
