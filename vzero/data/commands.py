"""`vzero data ...`: make, check and import datasets from the command line.

    vzero data synth --out X.parquet --n N --seed S [--image-size 336]
    vzero data check X.parquet [--quarantine Q.parquet] [--max-pixels N]
    vzero data import-vzero --out X.parquet [--quarantine Q.parquet] [--data-root DIR] SRC.parquet [SRC2 ...]

`check` and `import-vzero` print one JSON line `{"rows", "ok", "quarantined", "reasons"}` to stdout (`import-vzero`
adds `notes`: what was done to imported rows, e.g. images resized to their own pixel budget); bad rows are
counted (and written to the quarantine file when one is given) but are not an error. Exit status 2, with a message
on stderr naming the problem, only when a file itself is unusable (not Parquet, a required column missing).

`vzero.cli` mounts these with `register(subparsers)`; `python -m vzero.data.commands ...` runs them standalone.
`check` reads `answer` only to copy it into the quarantine file: it is not the training path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vzero.data import schema as S
from vzero.data.import_vzero import import_vzero
from vzero.data.quarantine import QuarantineWriter
from vzero.data.synth import write_synth
from vzero.data.validate import DEFAULT_MAX_PIXELS, check_duplicate, validate_row

EXIT_OK = 0
EXIT_UNUSABLE_FILE = 2
_CHECK_BATCH = 64  # rows per read in `check`


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `data {synth,check,import-vzero}`; each leaf sets `func(args) -> int`."""
    data = subparsers.add_parser("data", help="make, check and import datasets")
    sub = data.add_subparsers(dest="data_command", required=True)

    synth = sub.add_parser("synth", help="write a deterministic synthetic fine-grained visual task")
    synth.add_argument("--out", required=True, type=Path, help="output Parquet file")
    synth.add_argument("--n", required=True, type=_positive_int, help="number of rows")
    synth.add_argument("--seed", required=True, type=int, help="same seed and args -> byte-identical file")
    synth.add_argument("--image-size", type=int, default=336, help="square image side in pixels (default 336)")
    synth.set_defaults(func=_synth)

    check = sub.add_parser("check", help="validate every row; quarantine bad ones; print a JSON summary")
    check.add_argument("path", type=Path, help="dataset Parquet file")
    check.add_argument("--quarantine", type=Path, default=None, help="write bad rows + reason here")
    check.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS, help="largest w*h accepted")
    check.set_defaults(func=_check)

    imp = sub.add_parser("import-vzero", help="convert the authors' verl-style Parquet into our schema")
    imp.add_argument("--out", required=True, type=Path, help="output Parquet file")
    imp.add_argument(
        "--quarantine",
        type=Path,
        default=None,
        help="rows that cannot be converted (default: <out>.quarantine.parquet)",
    )
    imp.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS, help="largest w*h accepted")
    imp.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="relative image paths start here and no image path may leave it (default: each source file's folder)",
    )
    imp.add_argument("sources", nargs="+", type=Path, help="source Parquet file(s)")
    imp.set_defaults(func=_import)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `main(["data", "check", "X.parquet"])` (the leading "data" is optional)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] != "data":
        args_list = ["data", *args_list]
    parser = argparse.ArgumentParser(prog="vzero")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(args_list)
    return int(args.func(args))


def check_file(
    path: str | os.PathLike[str], *, quarantine: str | os.PathLike[str] | None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, Any]:
    """Validate every row of `path`, one row group at a time; returns the JSON summary. Raises DataFileError."""
    pf = S.open_dataset(path)
    writer = QuarantineWriter(quarantine, pf.schema_arrow) if quarantine is not None else None
    rows = ok = 0
    reasons: Counter[str] = Counter()
    seen: set[str] = set()
    try:
        for raw in _rows(pf, path):
            prompt, reason = validate_row(raw, max_pixels=max_pixels)
            if prompt is not None:
                reason = check_duplicate(prompt.uid, seen)
            if reason is None:
                ok += 1
            else:
                reasons[reason] += 1
                if writer is not None:
                    writer.add(raw, reason=reason, row_index=rows)
            rows += 1
    finally:
        if writer is not None:
            writer.close()
    return {"rows": rows, "ok": ok, "quarantined": sum(reasons.values()), "reasons": dict(reasons)}


def _rows(pf: pq.ParquetFile, path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Rows in file order, a small record batch at a time (never the whole file in memory)."""
    batches = pf.iter_batches(batch_size=_CHECK_BATCH)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as e:
            raise S.DataFileError(f"{path}: data pages unreadable ({e})") from e
        yield from batch.to_pylist()


def _synth(args: argparse.Namespace) -> int:
    n = write_synth(args.out, args.n, args.seed, args.image_size)
    print(json.dumps({"rows": n, "out": str(args.out)}))
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    try:
        summary = check_file(args.path, quarantine=args.quarantine, max_pixels=args.max_pixels)
    except S.DataFileError as e:
        print(f"vzero data check: {e}", file=sys.stderr)
        return EXIT_UNUSABLE_FILE
    print(json.dumps(summary))
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    quarantine = args.quarantine or args.out.with_name(args.out.stem + ".quarantine.parquet")
    try:
        report = import_vzero(
            args.sources, args.out, quarantine=quarantine, max_pixels=args.max_pixels, data_root=args.data_root
        )
    except S.DataFileError as e:
        print(f"vzero data import-vzero: {e}", file=sys.stderr)
        return EXIT_UNUSABLE_FILE
    print(json.dumps({**report.as_dict(), "out": str(args.out), "quarantine": str(quarantine)}))
    return EXIT_OK


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
