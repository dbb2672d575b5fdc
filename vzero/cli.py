"""`vzero` command line: train, data, model (and eval / recipe where installed).

vzero train --config configs/tiny-cpu.yaml steps=3 output_dir=runs/x     # key.sub=value overrides
vzero train --config ... --resume                                        # continue from the last checkpoint
vzero data synth|check|import-vzero ...
vzero model tiny --out DIR [--arch qwen2_vl|qwen2_5_vl] [--preset tiny|small|3b]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vzero.config import ConfigError, load_config

# Sub-command modules register themselves; each exposes register(subparsers).
COMMAND_MODULES = (
    "vzero.data.commands",
    "vzero.models.commands",
    "vzero.eval.commands",
    "vzero.eval.regate_commands",
    "vzero.recipes.commands",
)


def _train(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from vzero.driver import train

    train(cfg, resume=args.resume)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vzero", description="V-Zero on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a V-Zero training job (local Ray cluster or the one you are in)")
    t.add_argument("--config", help="YAML config (see configs/)")
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. rollout.n=4 steps=3")
    t.set_defaults(func=_train)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # optional command group not present
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
