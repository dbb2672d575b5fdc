"""`vzero recipe prior-trap`: the controlled prior-trap experiment from the command line.

    scripts/loopback.sh vzero recipe prior-trap --out results/prior-trap               # full CPU run
    scripts/loopback.sh vzero recipe prior-trap --smoke --out /tmp/prior-trap-smoke    # CI form, ~2 min on 2 cores
    vzero recipe prior-trap --preset small --device cuda --out results/prior-trap-small  # GPU-sized

Writes results.json, results.md, curves.png and weights.png to --out; data, models and runs live under --work
(default runs/prior-trap[-smoke]) and finished pieces are reused, so a re-run after a crash continues. Starts a local
Ray cluster (hence `scripts/loopback.sh`). Prints one JSON line with the final trap P-rate per method.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `recipe prior-trap` to the `recipe` sub-commands; sets `func(args) -> int`."""
    p = sub.add_parser(
        "prior-trap",
        help="controlled test of the gate's mechanism: a teacher with a dataset prior, OPD vs gate variants",
        description="See vzero/recipes/prior_trap.py for every step and results/prior-trap/README.md for our runs.",
    )
    p.add_argument("--out", type=Path, default=Path("results/prior-trap"), help="results directory")
    p.add_argument("--work", type=Path, default=None, help="data, models, runs (default runs/prior-trap[-smoke])")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="distillation seeds (default 0 1 2 3 4)")
    p.add_argument("--preset", choices=("tiny", "small"), default="tiny", help="model size (small: GPU-sized)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where models run (default cpu)")
    p.add_argument("--steps", type=int, default=None, help="label-free steps per run (default from the plan)")
    p.add_argument("--lr", type=float, default=None, help="label-free learning rate (default from the plan)")
    p.add_argument("--methods", nargs="+", default=None, help="subset of methods to run (default: all)")
    p.add_argument("--require-premises", action="store_true", help="stop before the runs if a premise fails")
    p.add_argument("--report-only", action="store_true", help="train nothing: report the runs that finished")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 seed, 2 steps (CI)")
    p.set_defaults(func=_prior_trap)


def _prior_trap(args: argparse.Namespace) -> int:
    from vzero.recipes.prior_trap import plan_for, run_prior_trap
    from vzero.recipes.prior_trap_data import TRAP

    if args.steps is not None and args.steps < 1:
        print("vzero recipe prior-trap: --steps must be >= 1", file=sys.stderr)
        return 2
    plan = plan_for(
        args.preset,
        smoke=args.smoke,
        device=args.device,
        seeds=tuple(args.seeds) if args.seeds else None,
        steps=args.steps,
        lr=args.lr,
        methods=tuple(args.methods) if args.methods else None,
    )
    work = args.work or Path("runs/prior-trap-smoke" if args.smoke else "runs/prior-trap")
    command = shlex.join(["vzero", *getattr(args, "argv", sys.argv[1:])])
    res = run_prior_trap(
        args.out, plan, work, command=command, require_premises=args.require_premises, report_only=args.report_only
    )
    line = {m: [r["curve"][-1]["p_rate"][TRAP] for r in per.values()] for m, per in res["runs"].items()}
    print(json.dumps({"out": str(args.out), "best_gate_for_k3": res["best_gate_for_k3"], "trap_p_rate": line}))
    return 0
