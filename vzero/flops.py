"""Model FLOPs utilisation (MFU) of a training step, the number GPU learners are judged by.

MFU = 6 · N · tokens / (seconds · peak FLOP/s): 6 = forward (2) + backward (4) FLOPs per parameter per token, N =
parameters on the text path (the vision tower sees patches, not tokens; its share is small at fixed image budgets),
tokens = every position of the padded-free sequences (prompt, image tokens and response). Peak = dense bf16 tensor
FLOP/s of the GPU (H100/H200 SXM: 989 TFLOP/s). Returns None on CPU or unknown GPUs unless a peak is given.
"""

from __future__ import annotations

import torch

# dense bf16 peak TFLOP/s (no sparsity), by substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_tflops(device: torch.device | str, override: float | None = None) -> float | None:
    if override is not None:
        return override
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def text_params(model: torch.nn.Module) -> int:
    """Parameters outside the vision tower (the ones every token passes through)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".visual." not in f".{n}")


def mfu(n_params: int, tokens: float, seconds: float, peak: float | None) -> float | None:
    if peak is None or seconds <= 0:
        return None
    return 6.0 * n_params * tokens / seconds / (peak * 1e12)
