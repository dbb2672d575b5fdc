"""`vzero regate RUN_DIR`: re-tune the gate offline from a run's logged teacher log-probs (no model, no teacher).

    vzero regate runs/x                                         # α 0.5 1 2 at the run's γ, bounds and level
    vzero regate runs/x --alpha 0.25 0.5 1 2 4 --level sequence token --gamma 0.5 1
    vzero regate runs/x --labels eval-or-train.parquet          # + AUC of weight vs correctness (evaluation only)

Every option takes one or more values; the table has one row per combination (the cartesian product) plus an
`as run` row (the weights the run applied). Unset options default to the run's own value (RUN_DIR/config.yaml);
α defaults to 0.5 1 2 plus the run's. Writes the table as JSON (`--out`, default RUN_DIR/regate.json) and markdown
next to it (same name, `.md`), and prints the markdown. Exit status 2 with a one-line message on stderr for a
directory without trajectories, a trajectory file missing columns, or a labels file without `id` / `answer`.
See vzero/eval/regate.py for what every column means.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_UNUSABLE_INPUT = 2


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `regate`; sets `func(args) -> int`."""
    p = subparsers.add_parser(
        "regate",
        help="recompute gate weights from a run's logged teacher log-probs for a grid of settings (no model)",
        description="Offline re-gating from RUN_DIR/trajectories/*.parquet; see vzero/eval/regate.py.",
    )
    p.add_argument("run_dir", type=Path, help="a run's output_dir (holds trajectories/ and config.yaml)")
    p.add_argument("--alpha", type=float, nargs="+", default=None, help="α values (default 0.5 1 2 + the run's)")
    p.add_argument("--gamma", type=float, nargs="+", default=None, help="γ values (default: the run's)")
    p.add_argument("--w-min", type=float, nargs="+", default=None, help="lower clamps (default: the run's)")
    p.add_argument("--w-max", type=float, nargs="+", default=None, help="upper clamps (default: the run's)")
    p.add_argument("--level", nargs="+", default=None, help="sequence and/or token (default: the run's)")
    p.add_argument("--labels", type=Path, default=None, help="Parquet with id + answer: adds AUC (evaluation only)")
    p.add_argument("--tokenizer", type=Path, default=None, help="decode with this model dir (default: the student's)")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default RUN_DIR/regate.json; .md beside it)")
    p.set_defaults(func=_regate)


def _run_gate(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("gate", {})


def _regate(args: argparse.Namespace) -> int:
    from vzero.eval.regate import RegateError, make_grid, regate, render_markdown

    try:
        own = _run_gate(args.run_dir) if args.run_dir.is_dir() else {}
        alphas = args.alpha or sorted({0.5, 1.0, 2.0, float(own.get("alpha", 0.5))})
        grid = make_grid(
            alphas,
            args.gamma or [float(own.get("gamma", 1.0))],
            args.w_min or [float(own.get("w_min", 0.0))],
            args.w_max or [float(own.get("w_max", 2.0))],
            args.level or [str(own.get("level", "sequence"))],
        )
        result = regate(args.run_dir, grid, labels=args.labels, tokenizer_dir=args.tokenizer)
    except RegateError as e:
        print(f"vzero regate: {e}", file=sys.stderr)
        return EXIT_UNUSABLE_INPUT
    out = args.out or args.run_dir / "regate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = render_markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md, end="", flush=True)
    return 0
