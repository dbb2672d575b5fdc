"""`vzero` command line: train, data, model (and eval / recipe where installed).

vzero train --config configs/tiny-cpu.yaml steps=3 output_dir=runs/x     # key.sub=value overrides
vzero train --config ... --resume                                        # continue from the last checkpoint
vzero train --config ... --overwrite                                     # delete output_dir's old run first
vzero data synth|check|import-vzero ...
vzero model tiny --out DIR [--arch qwen2_vl|qwen2_5_vl|qwen3_vl|qwen3_5] [--preset tiny|small|3b|4b]
vzero report RUN_DIR [--out DIR]                                         # the run as an HTML page

A user error (vzero.errors.UserError, vzero.config.ConfigError: bad config, unusable data, missing model, impossible
resources, a full disk) prints one message and exits with status 2, no traceback; a run that stopped on a failure
`--resume` gets past (vzero.errors.RunStopped: a learner died) prints one message and exits with status 3; any other
exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vzero.config import ConfigError, load_config
from vzero.errors import EXIT_RUN_STOPPED, EXIT_USER_ERROR, RunStopped, UserError

# Sub-command modules register themselves; each exposes register(subparsers).
COMMAND_MODULES = (
    "vzero.data.commands",
    "vzero.models.commands",
    "vzero.eval.commands",
    "vzero.eval.regate_commands",
    "vzero.recipes.commands",
    "vzero.report.commands",
)


def _train(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from vzero.preflight import prepare_inputs

    prepare_inputs(cfg)  # before the driver's heavy imports: a user error is reported in seconds
    from vzero.driver import train

    try:
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as exc:  # refused at startup (e.g. output_dir holds another run), before any actor starts
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vzero", description="V-Zero on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a V-Zero training job (local Ray cluster or the one you are in)")
    t.add_argument("--config", help="YAML config (see configs/)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    again.add_argument(
        "--overwrite", action="store_true", help="delete the outputs of a run already in output_dir, then start fresh"
    )
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%X")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what was asked, for results that record their command
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUN_STOPPED


if __name__ == "__main__":
    sys.exit(main())
