"""Ray plumbing for the driver: connect, check resources, spawn actors from plain classes, survive actor restarts.

Actors are plain classes (`actors.sampler.Sampler`, ...) made remote here with resources from the config, so the
same classes run in-process in tests. Errors name things: a resource shortfall lists what is requested against what
the cluster has; an actor that fails in `__init__` re-raises its own exception.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from vzero.config import ActorResources, TrainConfig
from vzero.console import actor_runtime_env, ray_log_level
from vzero.errors import UserError

log = logging.getLogger("vzero")
ACTOR_ERRORS = (RayActorError, ActorDiedError, ActorUnavailableError)


def connect(cfg: TrainConfig) -> None:
    """Join the cluster we run in (ray job submit / RAY_ADDRESS / ray.address) or start a local one on 127.0.0.1."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # Actors re-import our packages in their own processes: make the repo root importable for them.
    # Quiet unless logging.verbose: the actors' libraries log warnings and errors only (vzero/console.py).
    env = {"PYTHONPATH": _pythonpath(), "TOKENIZERS_PARALLELISM": "false"}
    runtime_env = actor_runtime_env(cfg.logging.verbose, env)
    level = ray_log_level(cfg.logging.verbose)
    if address:
        ray.init(
            address=address,
            namespace=cfg.ray.namespace,
            runtime_env=runtime_env,
            log_to_driver=True,
            logging_level=level,
        )
    else:
        ray.init(
            address="local",  # always a new cluster: never attach to some other `ray start` on this machine
            num_cpus=cfg.ray.num_cpus,
            num_gpus=cfg.ray.num_gpus,
            include_dashboard=cfg.ray.include_dashboard,
            dashboard_host="127.0.0.1",
            namespace=cfg.ray.namespace,
            runtime_env=runtime_env,
            logging_level=level,
            _node_ip_address="127.0.0.1",
        )


def _pythonpath() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts = [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return os.pathsep.join(dict.fromkeys(parts))


def requested_resources(cfg: TrainConfig) -> dict[str, float]:
    """Total CPUs/GPUs the job's actors ask Ray for (also used to check the KubeRay manifests); vzero/placement.py
    has the per-actor bundles (learner ranks, tensor-parallel engines)."""
    from vzero.placement import bundles

    out = {"CPU": 0.0, "GPU": 0.0}
    for b in bundles(cfg):
        for k in out:
            out[k] += b.resources.get(k, 0.0)
    return out


def check_resources(cfg: TrainConfig) -> None:
    """Fail before spawning anything if the cluster can never fit the actors (they would pend forever)."""
    from vzero.placement import alive_nodes, check_layout

    have = ray.cluster_resources()
    want = requested_resources(cfg)
    short = {k: (v, have.get(k, 0.0)) for k, v in want.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        detail = ", ".join(f"{k}: requested {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
        raise UserError(
            f"the cluster cannot fit this job's actors ({detail}). Lower rollout.num_samplers / "
            "*.resources.num_cpus / num_gpus, or add nodes (ray.num_cpus for a local cluster)."
        )
    check_layout(cfg, alive_nodes())  # the totals fit; now per node (TP engines, learner ranks, custom resources)


def spawn(cls: type, resources: ActorResources, name: str, *args: Any, placement: Any = None) -> Any:
    """`ray.remote(**opts)(cls)` with the config's resources; restarts come from `max_restarts`. `placement` is a
    scheduling strategy (a placement-group bundle, vzero/placement.py) or None."""
    opts = dict(
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
        max_restarts=resources.max_restarts,
        max_task_retries=0,  # the driver retries work itself, with the same seed, after re-pushing weights
        name=name,
        get_if_exists=False,
    )
    if resources.custom:
        opts["resources"] = dict(resources.custom)
    if placement is not None:
        opts["scheduling_strategy"] = placement
    return ray.remote(**opts)(cls).remote(*args)


def wait_ready(actors: dict[str, Any], probe: str = "ready", timeout_s: float = 900.0) -> dict[str, Any]:
    """Block until every actor finished `__init__`; re-raise the first init failure with the actor's name."""
    refs = {name: getattr(a, probe).remote() for name, a in actors.items()}
    out = {}
    for name, ref in refs.items():
        try:
            out[name] = ray.get(ref, timeout=timeout_s)
        except ACTOR_ERRORS as exc:
            cause = getattr(exc, "cause", None) or exc
            raise RuntimeError(f"actor {name!r} failed to start: {cause}") from exc
    return out


def call_with_retry(
    submit: Callable[[], Any],
    *,
    what: str,
    on_restart: Callable[[], None] | None = None,
    first: Any = None,
    deadline_s: float = 300.0,
    on_fault: Callable[[], None] | None = None,
    fatal: Callable[[BaseException], bool] | None = None,
) -> Any:
    """ray.get(submit()); if the actor died, wait for Ray to restart it, run `on_restart` (e.g. re-push weights) and
    resubmit the same work. `first` is an already submitted ref to wait on before any resubmission. Gives up after
    `deadline_s` (an actor out of `max_restarts` never comes back). `on_fault` runs once per failure of the work itself
    (not for a failed `on_restart`: the actor was still coming back), so counting there counts each death once; an
    error `fatal` accepts (an actor no retry brings back, e.g. the learner whose weights a push carries) is raised."""
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            ref = first if attempt == 0 and first is not None else submit()
            result = ray.get(ref)
            if attempt and on_restart is None:
                log.info("%s: recovered after %d retries", what, attempt)
            return result
        except ACTOR_ERRORS as exc:
            if fatal is not None and fatal(exc):
                raise
            attempt += 1
            if on_fault is not None:
                on_fault()
            if time.monotonic() - start > deadline_s:
                raise RuntimeError(f"{what} failed for {deadline_s:.0f}s ({attempt} tries); last error: {exc}") from exc
            log.warning("%s: actor unavailable (%s); retry %d", what, type(exc).__name__, attempt)
            time.sleep(min(5.0, 0.25 * 2**attempt))  # the restarted actor re-runs __init__ (loads its model)
            if on_restart is not None:
                try:
                    on_restart()
                except ACTOR_ERRORS:
                    continue  # still restarting: the next round tries again
