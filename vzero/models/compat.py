"""Can two models share token ids? The teacher replays the student's sampled response ids as they are.

`tokenizer_mismatch(a, b)` is the pure check: the same id must name the same token in both vocabularies (every id
either can produce), or the teacher scores tokens the student never wrote. Chat templates may differ: each side
builds its own prompt with its own tokenizer. `check_same_tokenizer(student_dir, teacher_dir)` loads both and
raises `TokenizerMismatchError` naming the first ids that differ.

Knows nothing about Ray, engines or the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TokenizerMismatchError(ValueError):
    """Student and teacher tokenizers map ids to different tokens."""


def tokenizer_mismatch(student: Any, teacher: Any, *, show: int = 3) -> str | None:
    """None if every id means the same token in both tokenizers, else a one-line description of the difference."""
    a = {i: t for t, i in student.get_vocab().items()}
    b = {i: t for t, i in teacher.get_vocab().items()}
    if a == b:
        return None
    differ = sorted(i for i in a.keys() | b.keys() if a.get(i) != b.get(i))
    examples = ", ".join(f"id {i}: {a.get(i)!r} vs {b.get(i)!r}" for i in differ[:show])
    return (
        f"{len(differ)} of {max(len(a), len(b))} token ids differ (student has {len(a)} ids, teacher {len(b)}; "
        f"{examples})"
    )


def check_same_tokenizer(
    student_dir: str | Path,
    teacher_dir: str | Path,
    *,
    student_remote_code: bool = False,
    teacher_remote_code: bool = False,
) -> None:
    """Raise TokenizerMismatchError unless the two model directories' tokenizers share every id."""
    if Path(student_dir).resolve() == Path(teacher_dir).resolve():
        return
    from transformers import AutoTokenizer

    def load(path: str | Path, remote: bool) -> Any:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=remote)

    problem = tokenizer_mismatch(load(student_dir, student_remote_code), load(teacher_dir, teacher_remote_code))
    if problem is not None:
        raise TokenizerMismatchError(
            f"the teacher ({teacher_dir}) cannot replay the student's ({student_dir}) responses: {problem}. "
            "Use a teacher of the same tokenizer family (e.g. Qwen2.5-VL 3B and 7B share one)"
        )
