"""How much quarantining bad rows slows the training stream: one epoch of `PromptStream` over a 10,000-row file with
about 5 % bad rows of every kind (vzero/data/bad_rows.py), against the same file with those rows made good. Both
runs write a quarantine file (the clean one stays empty), as the driver does. Target: the bad file's prompts/s at
least half the clean file's (a slowdown of at most 2x). Writes JSON with the command that made it.

    python -m bench.data_stream --out bench/results/data-stream-cpu.json [--rows 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vzero.data.bad_rows import write_bad_rows_file
from vzero.data.quarantine import QuarantineWriter
from vzero.data.stream import PromptStream

TARGET_SLOWDOWN = 2.0


def epoch_seconds(path: Path, quarantine: Path, *, batch: int) -> tuple[float, int, int]:
    """Seconds to open the stream and serve one whole epoch (quarantining as it goes); prompts served, quarantined."""
    t0 = time.perf_counter()
    writer = QuarantineWriter(quarantine)
    stream = PromptStream(path, seed=0, quarantine=writer)
    served = 0
    while stream.epoch == 0:
        served += len(stream.next_batch(batch))
    writer.close()
    return time.perf_counter() - t0, served, stream.quarantined


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--bad-fraction", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=16, help="prompts per next_batch call")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    command = ["python", "-m", "bench.data_stream", "--out", str(args.out), "--rows", str(args.rows)]
    command += ["--bad-fraction", str(args.bad_fraction), "--batch", str(args.batch), "--repeats", str(args.repeats)]
    result: dict = {
        "what": "one epoch of the training stream with quarantine: file with bad rows vs the same file clean",
        "command": " ".join(command),
    }
    with tempfile.TemporaryDirectory(prefix="vzero-bench-stream-") as tmp:
        files = {"clean": Path(tmp) / "clean.parquet", "bad": Path(tmp) / "bad.parquet"}
        write_bad_rows_file(files["clean"], args.rows, bad_fraction=args.bad_fraction, clean=True)
        planted = write_bad_rows_file(files["bad"], args.rows, bad_fraction=args.bad_fraction)
        runs: dict[str, list[tuple[float, int, int]]] = {"clean": [], "bad": []}
        for _ in range(args.repeats):  # interleaved, so machine load drifts hit both alike
            for name, path in files.items():
                runs[name].append(epoch_seconds(path, Path(tmp) / f"q-{name}.parquet", batch=args.batch))
    for name, rs in runs.items():
        seconds = statistics.median(r[0] for r in rs)
        result[name] = {
            "rows": args.rows,
            "prompts_served": rs[0][1],
            "quarantined": rs[0][2],
            "epoch_seconds": [round(r[0], 3) for r in rs],
            "epoch_seconds_median": round(seconds, 3),
            "rows_per_s": round(args.rows / seconds, 1),
            "prompts_per_s": round(rs[0][1] / seconds, 1),
        }
    assert result["bad"]["quarantined"] == len(planted), "every planted row quarantined"
    slowdown = result["clean"]["prompts_per_s"] / result["bad"]["prompts_per_s"]
    result.update(
        {
            "slowdown_prompts_per_s": round(slowdown, 3),
            "target_slowdown_max": TARGET_SLOWDOWN,
            "meets_target": slowdown <= TARGET_SLOWDOWN,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "load_average": [round(x, 1) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
