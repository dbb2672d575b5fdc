"""Teacher/student tokenizer compatibility: the teacher replays the student's response ids, so every id must name
the same token in both vocabularies; a mismatch is named with the first differing ids."""

from __future__ import annotations

import shutil

import pytest

from vzero.models.compat import TokenizerMismatchError, check_same_tokenizer, tokenizer_mismatch
from vzero.models.loading import load_processor
from vzero.models.tokenizer import build_tokenizer


def test_same_tokenizer_passes_and_a_different_one_is_named(tiny_model, tmp_path) -> None:
    same = tmp_path / "same"
    shutil.copytree(tiny_model, same)
    check_same_tokenizer(tiny_model, same)  # a copy of the same model: fine
    student = load_processor(tiny_model).tokenizer
    other = build_tokenizer(400)
    problem = tokenizer_mismatch(student, other)
    assert problem is not None and "token ids differ" in problem and "student has 512 ids, teacher 400" in problem
    assert tokenizer_mismatch(student, load_processor(same).tokenizer) is None

    different = tmp_path / "different"
    shutil.copytree(tiny_model, different)
    other.save_pretrained(str(different))
    with pytest.raises(TokenizerMismatchError, match=r"cannot replay the student's .* token ids differ"):
        check_same_tokenizer(tiny_model, different)
