"""Time the embedded default end to end on this machine, as a user's `make run` does, and write JSON.

Fresh assets every time (synthetic data and the tiny model are built inside the timed run), a fresh local Ray
cluster, the shipped config unchanged except for the output locations. Target: <= 3 minutes on 2 cores.

    python -m bench.embedded --out bench/results/embedded-cpu.json     (make bench-cpu; run it inside
                                                                        scripts/loopback.sh like make does)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", default="configs/tiny-cpu.yaml")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vzero-bench-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "vzero.cli",
            "train",
            "--config",
            args.config,
            f"output_dir={tmp}/run",
            f"data.path={tmp}/data/synth-train.parquet",
            f"student.path={tmp}/models/tiny-qwen2vl",
            "logging.progress_bar=false",
        ]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            print(res.stdout[-3000:], res.stderr[-5000:], file=sys.stderr)
            return res.returncode
        metrics = [json.loads(line) for line in (Path(tmp) / "run/metrics.jsonl").read_text().splitlines()]
    step_s = [m["step/seconds"] for m in metrics]
    result = {
        "what": "embedded default end to end (synth data + tiny model build + Ray start + actors + steps + checkpoint)",
        "command": " ".join(["python", "-m", "bench.embedded", "--out", str(args.out), "--config", args.config]),
        "train_command": " ".join(cmd[1:]),
        "wall_seconds": round(wall, 2),
        "target_seconds": 180,
        "meets_target": wall <= 180,
        "steps": len(metrics),
        "step_seconds": [round(s, 3) for s in step_s],
        "engine_rollout_tokens_per_s": [round(m["rollout/tokens_per_s"], 1) for m in metrics],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
