"""`vzero eval`: accuracy of a model directory on a labelled Parquet file, as one JSON line.

    vzero eval --model runs/x/checkpoints/step_000010/model --data eval.parquet
    vzero eval --model DIR --data X.parquet --views crop --engine transformers --max-pixels 12544 --out res.json

Prints one JSON line (accuracy, correct, evaluated, by_source, rows, invalid, invalid_reasons, ...; see
`vzero.eval.evaluate`) and writes the same object to `--out` when given. Exit status 2 with a message on stderr when
the data file itself is unusable (not Parquet, a required column or the `answer` column missing) or the model
directory does not exist; invalid rows are counted in the output, not an error. Heavy imports happen only when the
command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_UNUSABLE_INPUT = 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `eval`; sets `func(args) -> int`."""
    p = subparsers.add_parser(
        "eval",
        help="greedy accuracy of a model on a labelled Parquet file (exact match, per-source breakdown)",
        description="Greedy answers (temperature 0) through the project's engines, scored by exact match after "
        "normalisation (lowercase, punctuation stripped, first word).",
    )
    p.add_argument("--model", required=True, type=Path, help="HF model directory (e.g. a checkpoint's model/)")
    p.add_argument("--data", required=True, type=Path, help="Parquet file in the vzero schema, with `answer`")
    p.add_argument(
        "--views",
        choices=("full", "crop"),
        default="full",
        help="full = the image the student sees; crop = the evidence crop the teacher sees (default: %(default)s)",
    )
    p.add_argument(
        "--engine", choices=("auto", "vllm", "transformers"), default="auto", help="auto = vLLM where installed"
    )
    p.add_argument("--max-pixels", type=_positive_int, default=None, help="image pixel budget (default: the model's)")
    p.add_argument("--min-pixels", type=_positive_int, default=None, help="lower pixel bound (default: the model's)")
    p.add_argument("--margin", type=float, default=None, help="evidence-crop margin for --views crop (default 0.1)")
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N rows of the file")
    p.add_argument("--max-tokens", type=_positive_int, default=16, help="longest answer in tokens (default 16)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--system-prompt", default=None, help="system turn text (default: none, as the authors)")
    p.add_argument(
        "--enable-thinking", action="store_true", help="let the model reason first (default: off, as the authors)"
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON object here")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from vzero.config import ChatOptions
    from vzero.data.schema import DataFileError
    from vzero.eval.evaluate import evaluate
    from vzero.views import DEFAULT_MARGIN

    try:
        result = evaluate(
            args.model,
            args.data,
            views=args.views,
            engine=args.engine,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            limit=args.limit,
            margin=DEFAULT_MARGIN if args.margin is None else args.margin,
            max_tokens=args.max_tokens,
            device=args.device,
            chat=ChatOptions(system_prompt=args.system_prompt, enable_thinking=args.enable_thinking),
        )
    except (DataFileError, FileNotFoundError) as e:
        print(f"vzero eval: {e}", file=sys.stderr)
        return EXIT_UNUSABLE_INPUT
    line = json.dumps(result)
    print(line, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return EXIT_OK
