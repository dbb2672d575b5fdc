"""The driver's side of every weight push: which transport each sampler gets, the published versions, and the
collective protocol with its timeouts and fault recovery.

Transport choice (the ONE place it is made, `resolve_transports`): `learner.weight_transport=auto` gives CUDA IPC
to a sampler on the learner's GPU (zero copy) and the collective to every other sampler (a mix in one run is fine);
the object store only when asked (or, with a warning, where vLLM's process-group primitives are not importable).

The collective protocol for a push of version v to some samplers (learner/collective.py sends,
actors/collective_receiver.py receives):
  1. ask each sampler which weight group it is in; the call queues behind the sampler's work in flight, so when it
     answers the sampler is idle and the push's clock starts now, not behind a long `generate`;
  2. a sampler whose group is not the one the learner holds (first push, or restarted by Ray) gets a fresh group
     (new port): its join and the learner's join run together, bounded by `learner.weight_push_timeout_s`;
  3. the samplers' `receive_weights` calls are started, THEN the learner's `send_weights` (every broadcast blocks
     until all ranks arrived, so the receivers must already be in flight); only the plan travels through Ray;
  4. everything is awaited with the timeout: a sampler that has not finished by then fails the push with an error
     naming it (a hung peer never blocks the run forever). A sampler that died is waited for (Ray restarts it),
     gets a fresh group and the same push; the others keep what they received.
A sampler known to hold the version already is skipped (the pusher remembers what each group last received).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import ActorDiedError

from vzero.cluster import ACTOR_ERRORS, call_with_retry
from vzero.config import TrainConfig
from vzero.engines import vllm_available
from vzero.loop_state import pushes_to_keep
from vzero.stops import died

log = logging.getLogger("vzero")


def group_key(i: int) -> str:
    return f"sampler-{i}"


class WeightPusher:
    def __init__(
        self,
        cfg: TrainConfig,
        learner: Any,
        samplers: list[Any],
        *,
        restart_deadline_s: float = 300.0,
        on_fault: Callable[[], None] | None = None,
    ):
        self.cfg = cfg
        self.on_fault = on_fault  # called once per sampler death a push recovered from (the driver counts)
        self.learner = learner
        self.samplers = samplers
        self.timeout_s = cfg.learner.weight_push_timeout_s
        self.restart_deadline_s = restart_deadline_s  # as long as the driver waits for any restarted actor
        self.refs: dict[int, dict[str, Any]] = {}  # version -> transport -> ref of the learner's push
        self.groups: dict[int, str] = {}  # sampler -> id of the weight group the learner holds for it
        self.known: dict[int, int] = {}  # sampler -> version its group last received
        self.transports = self.resolve_transports()

    # -- the transport of each sampler ----------------------------------------------------------------------------
    def resolve_transports(self) -> list[str]:
        wanted = self.cfg.learner.weight_transport
        learner_gpu = ray.get(self.learner.device_uuid.remote())
        gpus = ray.get([s.device_uuid.remote() for s in self.samplers])
        if wanted == "collective":
            shared = [group_key(i) for i, u in enumerate(gpus) if learner_gpu and u == learner_gpu]
            if shared:
                raise RuntimeError(
                    f"learner.weight_transport=collective, but {', '.join(shared)} share(s) the learner's GPU and "
                    "NCCL refuses two ranks on one GPU; use learner.weight_transport=auto (CUDA IPC for those)"
                )
        if wanted != "auto":
            return [wanted] * len(self.samplers)
        other = "collective"
        if not vllm_available():
            log.warning(
                "weight transport: vLLM is not importable (its process groups carry the collective); "
                "using the object store for samplers off the learner's GPU"
            )
            other = "object_store"
        return ["cuda_ipc" if learner_gpu and u == learner_gpu else other for u in gpus]

    # -- publishing ---------------------------------------------------------------------------------------------------
    def publish(self, version: int) -> None:
        """Make the learner's current weights pushable, once per transport in use (collective: gathered and kept on
        the learner; object store: one put; CUDA IPC: buckets kept on the learner's GPU)."""
        self.refs[version] = {t: self.learner.state_for_push.remote(t) for t in dict.fromkeys(self.transports)}

    def prune(self, inflight: list[Any], pushed_version: int) -> None:
        """Keep exactly the pushes a retry may still send (vzero/loop_state.py); the learner frees the others'
        buckets. Collective pushes are held on the learner like CUDA IPC ones, so they follow the same rule (sync:
        none kept between pushes; a restarted sampler's push is published again, the learner idle at that version)."""
        held = "object_store" if "object_store" in self.transports else "cuda_ipc"
        keep = pushes_to_keep(inflight, pushed_version, mode=self.cfg.mode, transport=held)
        self.refs = {v: r for v, r in self.refs.items() if v in keep}
        self.learner.release_push.remote(sorted(keep))

    def _ref(self, version: int, transport: str) -> Any:
        """A push of `version` that is valid now (never one whose buckets the learner freed)."""
        ref = self.refs.get(version, {}).get(transport)
        if ref is not None:
            return ref
        current = ray.get(self.learner.policy_version.remote())
        if current != version:
            raise RuntimeError(f"no push of policy version {version} is kept and the learner is at {current}")
        self.publish(version)
        return self.refs[version][transport]

    # -- pushing ------------------------------------------------------------------------------------------------------
    def push_all(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        results = self.push(list(range(len(self.samplers))), version)
        seconds = time.perf_counter() - t0
        nbytes = max((r.get("bytes", 0.0) for r in results), default=0.0)
        n = max(1, len(self.transports))
        return {
            "weight_push/seconds": seconds,
            "weight_push/load_seconds_max": max(r["seconds"] for r in results),
            "weight_push/gb": nbytes / 1e9,
            "weight_push/gb_per_s": nbytes / 1e9 / seconds if seconds > 0 else 0.0,
            "sampler/min_version": min(r["version"] for r in results),
            "weight_push/transport_ipc": sum(t == "cuda_ipc" for t in self.transports) / n,
            "weight_push/transport_collective": sum(t == "collective" for t in self.transports) / n,
        }

    def push(self, indices: list[int], version: int) -> list[dict[str, float]]:
        """Bring samplers `indices` to published `version` (blocking); one result dict per sampler, in order."""
        direct = [i for i in indices if self.transports[i] != "collective"]
        collective = [i for i in indices if self.transports[i] == "collective"]
        submit: Callable[[], list[Any]] = lambda: [  # noqa: E731 - resubmitted as a whole after a restart
            self.samplers[i].update_weights.remote(self._ref(version, self.transports[i]), version) for i in direct
        ]
        first = submit() if direct else None
        out: dict[int, dict[str, float]] = {}
        if collective:
            out.update(self._push_collective(collective, version))
        if direct:
            # The learner's death is no sampler fault: its weights are in the push, so no retry repairs it.
            fatal = lambda exc: died(exc, self.learner)  # noqa: E731
            results = call_with_retry(submit, what="weight push", first=first, on_fault=self.on_fault, fatal=fatal)
            out.update(zip(direct, results, strict=True))
        return [out[i] for i in indices]

    def _push_collective(self, indices: list[int], version: int) -> dict[int, dict[str, float]]:
        start = time.monotonic()
        out: dict[int, dict[str, float]] = {}
        pending, attempt = list(indices), 0
        while pending:
            done, died = self._collective_round(pending, version)
            out.update(done)
            pending = died
            if not died:
                break
            attempt += 1
            for _ in died:  # each death once (the driver's faults/recovered), as for direct pushes
                if self.on_fault is not None:
                    self.on_fault()
            names = ", ".join(group_key(i) for i in died)
            if time.monotonic() - start > self.restart_deadline_s:
                raise RuntimeError(
                    f"weight push of version {version}: {names} died and did not come back within "
                    f"{self.restart_deadline_s:g}s"
                )
            log.warning("collective weight push: %s died; waiting for the restart (retry %d)", names, attempt)
            time.sleep(min(5.0, 0.25 * 2**attempt))
        return out

    def _collective_round(self, indices: list[int], version: int) -> tuple[dict[int, dict[str, float]], list[int]]:
        """One attempt: (results of the samplers that got the push, samplers that died on the way)."""
        died: list[int] = []
        ids: dict[int, str | None] = {}
        for i, ref in [(i, self.samplers[i].weight_group.remote()) for i in indices]:  # 1. idle now
            try:
                ids[i] = ray.get(ref)
            except ActorDiedError as exc:  # a fresh call: a restarting actor would answer once it is back
                raise RuntimeError(
                    f"weight push of version {version} to {group_key(i)} cannot complete: the sampler is dead and will "
                    f"not be restarted ({str(exc).splitlines()[-1]})"
                ) from exc
            except ACTOR_ERRORS:
                died.append(i)
        alive = [i for i in indices if i not in died]
        stale = [i for i in alive if ids[i] is None or ids[i] != self.groups.get(i)]
        for i in stale:  # 2. a fresh group for first pushes and restarted samplers
            self.known.pop(i, None)
        died += self._build_groups(stale)
        alive = [i for i in alive if i not in died]
        out = {i: self._skipped(i) for i in alive if self.known.get(i, -1) >= version}
        todo = [i for i in alive if i not in out]
        if not todo:
            return out, died
        push = self._ref(version, "collective")
        recv = {i: self.samplers[i].receive_weights.remote(push, version) for i in todo}  # 3. receivers first
        send = self.learner.send_weights.remote(version, [group_key(i) for i in todo])
        names = {r: group_key(i) for i, r in recv.items()}
        self._await([send, *recv.values()], names, f"weight push of version {version}")
        failed = ray.get(send)  # 4. {key: error} of groups whose broadcast failed
        for i, ref in recv.items():
            try:
                out[i] = ray.get(ref)
                self.known[i] = int(out[i]["version"])
            except ACTOR_ERRORS:
                died.append(i)
                self.groups.pop(i, None)
            else:
                if group_key(i) in failed:  # the sampler returned but the learner's side broke: rebuild next time
                    self.groups.pop(i, None)
        return out, died

    def _build_groups(self, indices: list[int]) -> list[int]:
        """Fresh groups (new ports) for `indices`; returns those that died meanwhile."""
        if not indices:
            return []
        ranks = ray.get([self.samplers[i].weight_ranks.remote() for i in indices])
        died = []
        for i, n in zip(indices, ranks, strict=True):  # one at a time: the learner joins each group in turn
            spec = ray.get(self.learner.open_weight_group.remote(group_key(i), 1 + n))
            key = group_key(i)
            joins = [self.samplers[i].join_weight_group.remote(spec), self.learner.join_weight_group.remote(key)]
            try:
                self._await(joins, {joins[0]: group_key(i)}, "weight-group rendezvous")
                ray.get(joins)
            except ACTOR_ERRORS:
                died.append(i)
                continue
            self.groups[i] = spec.group_id
            log.info(
                "weight group for %s on %s:%d (%d ranks, %s)",
                group_key(i),
                spec.host,
                spec.port,
                spec.world_size,
                spec.backend,
            )
        return died

    def _await(self, refs: list[Any], names: dict[Any, str], what: str) -> None:
        """Wait for all `refs`; an error of the learner's side is raised at once (the receivers then time out by
        themselves); past the timeout, fail naming the samplers that have not answered."""
        deadline = time.monotonic() + self.timeout_s
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                who = [names[r] for r in pending if r in names] or ["the learner"]
                raise RuntimeError(
                    f"{what} to {', '.join(who)} did not complete within learner.weight_push_timeout_s="
                    f"{self.timeout_s:g}s (collective transport): the peer is dead or hung"
                )
            if ready[0] not in names:
                ray.get(ready[0])  # the learner's side failed: raise its error now

    def _skipped(self, i: int) -> dict[str, float]:
        return {"skipped": 1.0, "seconds": 0.0, "tensors": 0.0, "bytes": 0.0, "version": float(self.known[i])}
