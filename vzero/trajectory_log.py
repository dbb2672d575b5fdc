"""Every step's trajectories as Parquet, with the per-token teacher log-probs.

The authors' code keeps no per-token teacher log-probs; with them the gate (α, γ, level, bounds) can be re-tuned and
re-evaluated offline without running the teacher again. Columns: step, uid (= group id), sample_index,
policy_version, prompt_ids, response_ids, lp_old, lp_pos, lp_neg (float32 lists, exactly the values the gate saw),
weight, token_weights, finish_reason, negative_mode.

Steps are numbered like metrics.jsonl and the checkpoints, from 1: `step_000003.parquet` holds the trajectories
trained in the step logged as step 3 and saved as `checkpoints/step_000003`.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vzero.records import Trajectory

SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("uid", pa.string()),
        ("sample_index", pa.int32()),
        ("policy_version", pa.int64()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("lp_old", pa.list_(pa.float32())),
        ("lp_pos", pa.list_(pa.float32())),
        ("lp_neg", pa.list_(pa.float32())),
        ("weight", pa.float32()),
        ("token_weights", pa.list_(pa.float32())),
        ("finish_reason", pa.string()),
        ("negative_mode", pa.string()),
    ]
)


def write_step(directory: Path, step: int, trajectories: list[Trajectory]) -> Path:
    """Write `step_<step>.parquet` atomically (`step` counts from 1, as in the metrics)."""
    if step < 1:
        raise ValueError(f"steps are numbered from 1, got {step}")
    directory.mkdir(parents=True, exist_ok=True)
    cols = {name: [] for name in SCHEMA.names}
    for t in trajectories:
        cols["step"].append(step)
        for name in SCHEMA.names[1:]:
            cols[name].append(getattr(t, name))
    path = directory / f"step_{step:06d}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.table(cols, schema=SCHEMA), tmp)
    tmp.replace(path)
    return path
