"""`vzero model ...` subcommands: build a random-init Qwen-VL model directory from the command line.

Contract: `register(subparsers)` adds `model tiny` to the project CLI; the handler returns an exit code
and prints ONE JSON line (path, arch, preset, dtype, seed, params), so scripts can parse it. Heavy imports
(torch, transformers) happen only when the command runs, keeping `vzero --help` fast.

    vzero model tiny --out /tmp/tiny-qwen2-vl
    vzero model tiny --out /tmp/qwen25-3b --arch qwen2_5_vl --preset 3b --device cuda
    vzero model tiny --out /tmp/qwen35-4b --arch qwen3_5 --preset 4b --device cuda   # the paper's student shapes
    python -m vzero.models.commands model tiny --out DIR  # same, without the project CLI
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vzero.models.presets import ARCHS, SIZES


def _run_tiny(args: argparse.Namespace) -> int:
    from vzero.models.loading import checkpoint_num_params
    from vzero.models.presets import get_preset
    from vzero.models.tiny import build_model

    dtype = args.dtype or get_preset(args.arch, args.preset).default_dtype

    path = build_model(args.out, arch=args.arch, preset=args.preset, seed=args.seed, dtype=dtype, device=args.device)
    record = {
        "path": str(path.resolve()),
        "arch": args.arch,
        "preset": args.preset,
        "dtype": dtype,
        "seed": args.seed,
        "params": checkpoint_num_params(path),
    }
    print(json.dumps(record), flush=True)
    return 0


def _add_tiny(subparsers: argparse._SubParsersAction) -> None:
    tiny = subparsers.add_parser(
        "tiny",
        help="build a random-init Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 model directory (no download)",
        description="Random weights, a locally trained tokenizer and the family's processor and chat template, "
        "saved with save_pretrained so transformers and vLLM both load the directory.",
    )
    tiny.add_argument("--out", required=True, help="directory to write (created if missing)")
    tiny.add_argument("--arch", choices=ARCHS, default="qwen2_vl", help="model family (default: %(default)s)")
    tiny.add_argument(
        "--preset",
        choices=SIZES,
        default="tiny",
        help="tiny: CPU tests; small: toy runs; 3b (Qwen2 families) / 4b (Qwen3 families): real shapes",
    )
    tiny.add_argument("--seed", type=int, default=0, help="weight init seed (default: %(default)s)")
    tiny.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="weight dtype (default: float32 for tiny/small, bfloat16 for 3b/4b)",
    )
    tiny.add_argument("--device", default="cpu", help="where to initialise the weights: cpu, cuda, cuda:1 ...")
    tiny.set_defaults(func=_run_tiny)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `model` (with its `tiny` subcommand) to the project CLI's subparsers."""
    model = subparsers.add_parser("model", help="build model directories")
    model_sub = model.add_subparsers(dest="model_command", metavar="{tiny}", required=True)
    _add_tiny(model_sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point with the project CLI's grammar: `main(["model", "tiny", "--out", DIR])`."""
    parser = argparse.ArgumentParser(prog="vzero", description="V-Zero model tools")
    register(parser.add_subparsers(dest="command", metavar="{model}", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
