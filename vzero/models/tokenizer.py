"""A small Qwen-style tokenizer built locally, so tiny models need no hub download.

Contract: `build_tokenizer(vocab_size, arch=...)` trains a byte-level BPE with the `tokenizers` library on a fixed
built-in corpus and returns the family's tokenizer class (`Qwen2Tokenizer`; `Qwen3_5Tokenizer` for Qwen3.5) whose
length is exactly `vocab_size`: the trained BPE ids come first and the family's special tokens take the last ids
(the 14 Qwen2-VL ones, then `<think>` / `</think>` for the Qwen3 families), the same layout as the real Qwen
tokenizers (BPE vocab, then `<|endoftext|>`, `<|im_start|>`, ... at the tail). It uses Qwen2's own normalizer,
pre-tokenizer regex and byte-level decoder (the tokenizer classes rebuild them from vocab + merges), carries the
family's chat template (`vzero.models.chat_templates`), eos `<|im_end|>` and pad `<|endoftext|>`. Families with
the same special tokens get the same ids for the same text (Qwen3-VL and Qwen3.5 tiny models share a vocabulary,
so one can teach the other).

The corpus is weighted towards the synthetic task's words (colours, shapes, digits, question templates)
so that every answer word is ONE token, with and without a leading space: a one-word answer is then one
sampled token plus `<|im_end|>`, which keeps toy experiments easy to read. The same call always gives the
same files (the corpus is a constant and BPE training is deterministic).

Knows nothing about models or images. Run `python -m vzero.models.tokenizer OUT_DIR [VOCAB [ARCH]]` to write one.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase

from vzero.models.families import get_family

# Qwen2's pre-tokenizer split (transformers/models/qwen2/tokenization_qwen2.py); digits split one by one.
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# Order as in Qwen2-VL's tokenizer (ids 151643..151656 there; the last 14 ids here).
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    VISION_PAD,
    IMAGE_PAD,
    VIDEO_PAD,
)

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
DIGITS: tuple[str, ...] = tuple("0123456789")
# Every word a one-word answer can be; tests check each is a single token.
ANSWER_WORDS: tuple[str, ...] = COLORS + SHAPES + DIGITS + ("yes", "no")

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

_SIZES = ("small", "large", "big", "tiny")
_PLACES = ("left", "right", "top", "bottom", "center", "middle", "corner")
_QUESTION_TEMPLATES = (
    "What color is the {size} {shape}?",
    "Which digit is written inside the {size} box?",
    "What shape is inside the {size} {color} frame?",
    "What is the color of the {shape} on the {place}?",
    "Which shape is {color}?",
    "How many {color} {shape}s are in the image?",
    "Is there a {color} {shape} in the {place} of the picture?",
    "What number is shown in the {place} corner?",
)
_INSTRUCTIONS = (
    "Answer with one word.",
    "Answer with a single word.",
    "Answer with one digit.",
    "Look at the image and answer the question.",
    "Reply with the answer only.",
)
_ENGLISH = (
    "The quick brown fox jumps over the lazy dog.",
    "What, which, where, when, who, why and how are question words.",
    "There is a shape in the picture. The shape has a color and a size.",
    "Each image shows a few shapes on a plain background, and one of them holds the answer.",
    "Please describe what you see in this image in a few words.",
    "The model looks at the image, reads the question, and writes a short answer.",
    "I think the answer is correct because the evidence is visible in the region.",
    "Count the objects, compare their colors, and name the one that is different.",
    "A square has four sides, a triangle has three sides, and a circle has none.",
    "Numbers such as 12, 345 and 6789 are written one digit at a time.",
    "Thank you! Sure, here is the answer. Sorry, I cannot see that clearly.",
    "The first, second and third items are above, below, beside or between the others.",
    "Questions about images need the visual evidence; without it the answer is a guess.",
    "Hello, how can I help you today? Let me look at the image first.",
)


def corpus() -> list[str]:
    """The fixed training corpus: chat turns over every task combination plus plain English.

    A list (not a generator) so its order is fixed; frequency decides which merges BPE learns first, and
    the task words occur hundreds of times, so they are merged before general English.
    """
    lines: list[str] = []
    for color, shape, size, place in itertools.product(COLORS, SHAPES, _SIZES, _PLACES):
        fields = {"color": color, "shape": shape, "size": size, "place": place}
        for template in _QUESTION_TEMPLATES:
            question = template.format(**fields)
            lines.append(
                f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n"
                f"{VISION_START}{IMAGE_PAD}{VISION_END}{question} {_INSTRUCTIONS[len(lines) % len(_INSTRUCTIONS)]}"
                f"{IM_END}\n{IM_START}assistant\n"
            )
    # Answers open an assistant turn with no leading space (Qwen's split keeps the newline apart), and
    # appear with one inside prose; 100 + 40 copies put both forms among the first merges at vocab 512.
    for word in ANSWER_WORDS:
        lines.extend([f"{word}{IM_END}"] * 100 + [f"The answer is {word}."] * 40)
    lines.extend(_ENGLISH * 10)
    return lines


def _bpe_backbone() -> Tokenizer:
    """An empty BPE with Qwen2's normalizer, pre-tokenizer and decoder, ready to train."""
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _train_bpe(n_tokens: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE of exactly `n_tokens` entries (256 bytes + merges); returns vocab, merges."""
    tok = _bpe_backbone()
    # The special tokens must not be learned as byte sequences: strip them from the corpus first.
    plain = corpus()
    for special in SPECIAL_TOKENS:
        plain = [line.replace(special, "\n") for line in plain]
    trainer = trainers.BpeTrainer(
        vocab_size=n_tokens,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(plain, trainer=trainer, length=len(plain))
    vocab = tok.get_vocab(with_added_tokens=False)
    if len(vocab) != n_tokens:
        raise ValueError(
            f"the built-in corpus supports a BPE of at most {len(vocab)} tokens, {n_tokens} were asked for; "
            f"use a tokenizer vocab_size <= {len(vocab) + len(SPECIAL_TOKENS)} or extend corpus()"
        )
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return vocab, merges


def family_tokens(arch: str = "qwen2_vl") -> tuple[str, ...]:
    """The tokens at the tail of `arch`'s vocabulary, in id order: the 14 Qwen2-VL specials, then the family's
    extra tokens (`<think>`, `</think>` for Qwen3-VL / Qwen3.5; added, not special, as in the released tokenizers)."""
    return SPECIAL_TOKENS + get_family(arch).extra_tokens


def build_tokenizer(vocab_size: int, out_dir: str | Path | None = None, *, arch: str = "qwen2_vl") -> Any:
    """Build `arch`'s tokenizer with exactly `vocab_size` ids; save it to `out_dir` if given.

    `vocab_size` counts the tail tokens (`family_tokens`), so ids run 0..vocab_size-1 and `len(tokenizer)`
    equals it: set the model's vocab to the same number and no logit is left without a token.
    """
    family = get_family(arch)
    tail = family_tokens(arch)
    if vocab_size < 256 + len(tail):
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 + {len(tail)} ids")
    vocab, merges = _train_bpe(vocab_size - len(tail))
    # Placing the specials in the vocab at the tail ids pins them there: the tokenizer class would otherwise
    # append them in its own order (eos first), unlike Qwen's `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`.
    vocab = {**vocab, **{t: len(vocab) + i for i, t in enumerate(tail)}}
    tokenizer = family.transformers_class("tokenizer")(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (ENDOFTEXT, IM_END)],
        model_max_length=32768,
        errors="replace",
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    if family.extra_tokens:  # already in the vocab: registering them only makes them unsplittable
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.extra_tokens])
    tokenizer.chat_template = family.chat_template
    _check_layout(tokenizer, vocab_size, tail)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _check_layout(tokenizer: PreTrainedTokenizerBase, vocab_size: int, tail: tuple[str, ...]) -> None:
    """Fail loudly unless the tail tokens hold the last ids in Qwen order (a library upgrade could move them)."""
    first = vocab_size - len(tail)
    got = tokenizer.convert_tokens_to_ids(list(tail))
    want = list(range(first, vocab_size))
    if got != want or len(tokenizer) != vocab_size:
        raise RuntimeError(f"special token ids {got} (len {len(tokenizer)}), expected {want} (len {vocab_size})")


if __name__ == "__main__":
    # python -m vzero.models.tokenizer OUT_DIR [VOCAB [ARCH]]
    args = [*sys.argv[1:], "512", "qwen2_vl"][:3]
    build_tokenizer(int(args[1]), out_dir=args[0], arch=args[2])
