"""Sharded learner ranks (`learner.world_size` > 1): process group, FSDP2 sharding, data-parallel bookkeeping, the
full-weight gather for pushes, and DCP checkpoints.

- `init_process_group`: torch.distributed over the learner group only (NCCL on GPU, gloo on CPU), rendezvous at the
  address the driver's facade picked (learner/group.py); the weight groups to the samplers are separate
  (vzero/weight_group.py).
- `shard`: FSDP2 `fully_shard` on every block the model family declares unsplittable (transformers'
  `_no_split_modules`: the decoder layers and vision blocks of every Qwen-VL family, no per-family table), then the
  root. Gradients are SUMMED across ranks (divide factor 1 + `set_force_sum_reduction_for_comms`: gloo has no
  PREMUL_SUM; force-sum alone still divides by the world size), and the loss already divides by the GLOBAL
  valid-token count, so N ranks give the gradients of one.
- `DataParallel`: each rank's share of a batch, the agreed number of micro-batches (every rank must run the same
  forward/backward passes, or the FSDP collectives hang: ranks short of work run a zero-loss pass), metrics summed
  (maxima for `*_max`) over ranks.
- `full_weights`: the whole model once, cast to the push dtype FIRST (a bf16 gather moves half the bytes of fp32);
  every rank takes part, rank 0 keeps it and sends.
- `save` / `load`: model + optimizer as DCP (`<checkpoint>/dcp/`, every rank writes its shards) plus the HF model dir
  from rank 0 (usable by vLLM / transformers as before), per-rank RNG, `dcp.json` (version, world size). DCP
  reshards on load, so a checkpoint resumes with another world size too; a world-size-1 learner reads it
  without a process group, and a sharded one reads a world-size-1 checkpoint (`load_unsharded`).
Measured on CPU (2 gloo ranks vs 1 process, tiny Qwen2-VL): the same loss, grad norm and weights (tests/learner).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

DCP_DIR = "dcp"
DCP_META = "dcp.json"


def init_process_group(rank: int, world_size: int, master: tuple[str, int], device: torch.device, timeout_s: float):
    if device.type == "cuda":  # Ray gives each rank one GPU: its cuda:0
        torch.cuda.set_device(device.index or 0)
    host, port = master
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{host}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def shard(model: torch.nn.Module) -> int:
    """fully_shard every unsplittable block, then the root; returns the number of blocks sharded."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} declares no _no_split_modules: cannot tell its decoder layers / vision blocks "
            "apart for FSDP (learner.world_size > 1)"
        )
    for m in blocks:
        fully_shard(m)
    fully_shard(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # a sum, not the default mean over ranks
            m.set_force_sum_reduction_for_comms(True)  # plain SUM on the wire (gloo has no PREMUL_SUM)
    return len(blocks)


def reshard(model: torch.nn.Module) -> None:
    """Back to sharded parameters after a no-grad forward: FSDP2 keeps the root's parameters unsharded after a
    forward (a backward would need them), and a training step that starts from there gets no reduce-scatter for
    them (measured: the 2-rank gradient norm then differs from the 1-rank one after an lp_old recompute)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class DataParallel:
    """This rank's place in the learner group, and the few collectives the training loop needs."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def share(self, items: list) -> list:
        """This rank's share (every rank gets the whole batch in the same order; round robin balances tokens)."""
        return items[self.rank :: self.world_size]

    def agree(self, n: int) -> int:
        """The largest `n` over ranks: how many passes every rank runs."""
        t = torch.tensor([n], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def merge(self, acc: dict[str, float]) -> dict[str, float]:
        """Sum the ranks' metric dicts (maximum for keys ending in `_max`); key sets may differ."""
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, acc)
        out: dict[str, float] = {}
        for part in parts:
            for k, v in part.items():
                out[k] = max(out.get(k, v), v) if k.endswith("_max") else out.get(k, 0.0) + v
        return out


def grad_norm(value: torch.Tensor) -> float:
    """clip_grad_norm_ over sharded gradients returns a DTensor: the global norm, materialised."""
    full = value.full_tensor() if hasattr(value, "full_tensor") else value
    return float(full)


@torch.no_grad()
def full_weights(model: torch.nn.Module, dtype: torch.dtype, skip: set[str], rank: int) -> list[tuple[str, Any]]:
    """(name, full tensor) of every state entry not in `skip`, cast to `dtype` before the gather; rank 0 only
    (other ranks take part in each all-gather and get an empty list). Every rank iterates in the same order."""
    out = []
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        t = t.detach().to(dtype)
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        if rank == 0:
            out.append((name, full))
    return out


# -- checkpoints ----------------------------------------------------------------------------------------------------
def save(directory: Path, model, optimizer, *, rank: int, world_size: int, source_model: str, version: int) -> None:
    """DCP shards from every rank + the HF model dir and dcp.json from rank 0 (the caller's directory is the
    driver's temporary checkpoint dir on the shared filesystem; the driver commits it once every rank returned)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    from vzero.checkpoint import copy_processor_files

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(directory / DCP_DIR))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(directory / "model", state_dict=full, safe_serialization=True)
        copy_processor_files(Path(source_model), directory / "model")
        (directory / DCP_META).write_text(json.dumps({"version": version, "world_size": world_size}))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(directory / f"rng_rank{rank}.safetensors"))
    if dist.is_initialized():
        dist.barrier()


def _restore_rng(directory: Path, rank: int) -> None:
    from safetensors.torch import load_file

    path = directory / f"rng_rank{rank}.safetensors"
    if not path.is_file():  # a checkpoint written by fewer ranks: this rank starts from its current RNG
        return
    rng = load_file(str(path))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def is_sharded_checkpoint(directory: Path) -> bool:
    return (Path(directory) / DCP_META).is_file()


def load(directory: Path, model, optimizer, *, rank: int) -> int:
    """Restore model + optimizer from DCP (resharded to this world size; no process group = one local process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)  # also materialises the optimizer's state to load into
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=False),  # parameters without a gradient yet have no optimizer state
    )
    _restore_rng(directory, rank)
    return int(json.loads((directory / DCP_META).read_text())["version"])


def load_unsharded(directory: Path, model, optimizer, *, rank: int) -> int:
    """A world-size-1 checkpoint (HF model dir + optimizer.safetensors) into sharded ranks: every rank reads the
    full tensors and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from vzero.checkpoint import read_training_state

    full_model, full_optim, version = read_training_state(directory, model, optimizer)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=full_model,
        optim_state_dict=full_optim,
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    _restore_rng(directory, rank)
    return version
