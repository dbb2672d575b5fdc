"""vzero.teacher_prompt: templates become chat parts with the full image first and the crops in order; the crop-only
context drops `<image>` and, for the default template, equals the student's one-image layout; rows' own wording is
kept verbatim; images are placed per marker (the negative swaps only the crops)."""

from __future__ import annotations

import pytest

from vzero.teacher_prompt import DEFAULT_TEMPLATE, count_markers, teacher_prompt
from vzero.vlm_inputs import chat_prompt_ids, user_parts

IMG, TXT = {"type": "image"}, "text"


def test_default_template_shows_the_full_image_then_the_crop_then_the_question():
    tp = teacher_prompt(DEFAULT_TEMPLATE, context="full_and_crop", question="What color?")
    assert tp.parts == [IMG, IMG, {"type": TXT, "text": "What color?"}]
    assert tp.slots == ("image", "crop")
    assert tp.images("FULL", ["CROP"]) == ["FULL", "CROP"]
    assert tp.images("FULL", ["NEG"]) == ["FULL", "NEG"]  # the negative swaps only the crop


def test_crop_context_is_the_students_one_image_layout(tiny_model):
    from vzero.models.loading import load_processor

    tok = load_processor(tiny_model).tokenizer
    tp = teacher_prompt(DEFAULT_TEMPLATE, context="crop", question="What color?")
    assert tp.parts == user_parts("What color?") and tp.slots == ("crop",)
    assert chat_prompt_ids(tok, tp.parts) == chat_prompt_ids(tok, "What color?")
    full = chat_prompt_ids(tok, teacher_prompt(DEFAULT_TEMPLATE, context="full_and_crop", question="What color?").parts)
    assert full.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 2


def test_a_rows_template_is_kept_verbatim_with_several_crops_in_order():
    template = "Scene: <image>\nZoom 1: <crop> zoom 2:<crop>\n  Which {question} sign?"
    assert count_markers(template) == (1, 2)
    tp = teacher_prompt(template, context="full_and_crop")  # no question: a row's wording stays as it is
    assert tp.parts == [
        {"type": TXT, "text": "Scene: "},
        IMG,
        {"type": TXT, "text": "\nZoom 1: "},
        IMG,
        {"type": TXT, "text": " zoom 2:"},
        IMG,
        {"type": TXT, "text": "\n  Which {question} sign?"},
    ]
    assert tp.images("F", ["c1", "c2"]) == ["F", "c1", "c2"]
    crop_only = teacher_prompt(template, context="crop")
    assert crop_only.slots == ("crop", "crop") and crop_only.images(None, ["c1", "c2"]) == ["c1", "c2"]


def test_mismatched_images_and_templates_without_a_crop_are_refused():
    tp = teacher_prompt("<image><crop><crop>q", context="full_and_crop")
    with pytest.raises(ValueError, match=r"2 <crop> marker\(s\) but 1 crop"):
        tp.images("F", ["c1"])
    with pytest.raises(ValueError, match="no full image"):
        tp.images(None, ["c1", "c2"])
    with pytest.raises(ValueError, match="at least one <crop>"):
        teacher_prompt("<image>{question}", context="full_and_crop", question="q")
    with pytest.raises(ValueError, match="unknown teacher context"):
        teacher_prompt(DEFAULT_TEMPLATE, context="full", question="q")  # type: ignore[arg-type]
