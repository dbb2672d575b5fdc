"""Ragged per-trajectory lists -> padded [B, T] tensors with a mask (the layout the gate and the losses take)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
