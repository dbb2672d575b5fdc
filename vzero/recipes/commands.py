"""`vzero recipe ...`: end-to-end experiment recipes from the command line.

    scripts/loopback.sh vzero recipe toy --out results/toy                     # full CPU run (~25 min on 2 cores)
    scripts/loopback.sh vzero recipe toy --smoke --out /tmp/toy-smoke          # reduced, a couple of minutes
    vzero recipe toy --preset small --device cuda --out results/toy-small      # the GPU-sized toy
    scripts/loopback.sh vzero recipe toy --smoke --arch qwen3_5 --out /tmp/toy-q35   # another model family

`toy` writes results.json, results.md and accuracy_vs_step.png to --out and keeps data, models and runs under --work
(default runs/toy, or runs/toy-smoke with --smoke); finished pieces found there are reused, so a re-run after a crash
continues. It starts a local Ray cluster, hence `scripts/loopback.sh`. Prints one JSON line with the summary.
Heavy imports happen only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from vzero.models.families import ARCHS


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `recipe toy` and `recipe prior-trap`; sets `func(args) -> int`."""
    recipe = subparsers.add_parser("recipe", help="end-to-end experiment recipes")
    sub = recipe.add_subparsers(dest="recipe_command", required=True)
    toy = sub.add_parser(
        "toy",
        help="controlled reproduction: crop-SFT teacher, label-free OPD vs V-Zero sequence / token gate, over seeds",
        description="See vzero/recipes/toy.py for every step and results/toy/README.md for the runs we made.",
    )
    toy.add_argument("--out", type=Path, default=Path("results/toy"), help="results directory (default results/toy)")
    toy.add_argument("--work", type=Path, default=None, help="data, models, runs (default runs/toy[-smoke])")
    toy.add_argument("--seeds", type=int, nargs="+", default=None, help="distillation seeds (default 0 1 2)")
    toy.add_argument("--preset", choices=("tiny", "small"), default="tiny", help="model size (small: GPU-sized)")
    toy.add_argument("--arch", choices=ARCHS, default="qwen2_vl", help="model family (default: %(default)s)")
    toy.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where models run (default cpu)")
    toy.add_argument("--steps", type=int, default=None, help="label-free steps per run (default from the plan)")
    toy.add_argument("--lr", type=float, default=None, help="label-free learning rate (default from the plan)")
    toy.add_argument("--context", type=float, default=None, help="student window / target side; 0 = whole images")
    toy.add_argument("--smoke", action="store_true", help="reduced sizes, 1 seed, a couple of minutes (CI)")
    toy.set_defaults(func=_toy)
    from vzero.recipes.prior_trap_commands import add_parser

    add_parser(sub)


def _toy(args: argparse.Namespace) -> int:
    from vzero.recipes.toy import METHODS, plan_for, run_toy

    seeds = tuple(args.seeds) if args.seeds else None
    if args.steps is not None and args.steps < 1:
        print("vzero recipe toy: --steps must be >= 1", file=sys.stderr)
        return 2
    plan = plan_for(
        args.preset,
        smoke=args.smoke,
        device=args.device,
        arch=args.arch,
        seeds=seeds,
        steps=args.steps,
        context=args.context,
        lr=args.lr,
    )
    work = args.work or Path("runs/toy-smoke" if args.smoke else "runs/toy")
    command = "vzero " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "vzero recipe toy"
    results = run_toy(args.out, plan, work, command=command)
    line = {m: results["summary"][m]["accuracy"] for m in METHODS}
    print(json.dumps({"out": str(args.out), "base": results["base"]["accuracy"], "accuracy": line}), flush=True)
    return 0
