"""`vzero report RUN_DIR [--out DIR] [--steps 1,5,9] [--prompts N]`: write the run's HTML report, print its path.

A directory that is not a run is a user error (one line, exit status 2, from vzero/cli.py). Heavy imports
(matplotlib, pyarrow) happen only when the command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `report`; sets `func(args) -> int`."""
    p = subparsers.add_parser(
        "report",
        help="a self-contained HTML page of a run: curves, gate histograms, prompts with both teacher views",
        description="See vzero/report/__init__.py for what the page shows.",
    )
    p.add_argument("run_dir", type=Path, help="a run's output_dir (finished or still running)")
    p.add_argument("--out", type=Path, default=None, help="where to write index.html and the PNGs (RUN_DIR/report)")
    p.add_argument("--steps", type=_steps, default=None, help="gallery steps, e.g. 1,5,9 (default first, middle, last)")
    p.add_argument("--prompts", type=_positive, default=3, help="prompts per gallery step (default 3)")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from vzero.report.build import build_report

    page = build_report(args.run_dir, args.out, steps=args.steps, prompts=args.prompts)
    print(f"report: {page}  (open it in a browser: file://{page.resolve()})")
    print(json.dumps({"report": str(page)}))
    return 0


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected step numbers like 1,5,9, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"steps are numbered from 1, got {text!r}")
    return steps


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
