"""Ragged per-trajectory lists -> padded [B, T] tensors with a mask (the layout the gate and the losses take), and
the split of a rollout batch into optimizer mini-batches of whole prompt groups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

import torch


class _Grouped(Protocol):
    uid: str  # prompt group id (a `Trajectory`'s uid)


_G = TypeVar("_G", bound=_Grouped)


def pad_ragged(
    rows: Sequence[Sequence[float]], *, value: float = 0.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[[...T_i...]] -> [B, max T] tensor, rows left-aligned, padded with `value`."""
    T = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), T), value, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def length_mask(lengths: Sequence[int]) -> torch.Tensor:
    """[B, max T] bool mask with the first T_i columns of row i set."""
    T = max(lengths, default=0)
    return torch.arange(T).unsqueeze(0) < torch.as_tensor(list(lengths), dtype=torch.long).unsqueeze(1)


def split_mini_batches(trajectories: Sequence[_G], k: int) -> list[list[_G]]:
    """Split a rollout batch into `k` optimizer mini-batches of WHOLE prompt groups (same `uid`), in order.

    A pure function of the trajectories: groups in order of first appearance, k contiguous runs of groups whose
    sizes differ by at most one (the first ones take the remainder), trajectory order kept inside. verl's PPO
    mini-batches are the same cut (its batch holds each prompt's n samples next to each other, no shuffle). Later
    data-parallel ranks shard each mini-batch; the split itself never depends on the rank or the machine.
    """
    if k < 1:
        raise ValueError(f"mini-batches per step must be >= 1, got {k}")
    groups: dict[str, list[_G]] = {}
    for t in trajectories:
        groups.setdefault(t.uid, []).append(t)
    if len(groups) < k:
        raise ValueError(
            f"learner.mini_batches_per_step={k} needs at least {k} prompt groups per step, got {len(groups)}: "
            "a mini-batch holds whole groups (lower learner.mini_batches_per_step or raise rollout.prompts_per_step)"
        )
    runs = list(groups.values())
    base, extra = divmod(len(runs), k)
    out: list[list[_G]] = []
    start = 0
    for j in range(k):
        stop = start + base + (j < extra)
        out.append([t for run in runs[start:stop] for t in run])
        start = stop
    return out
