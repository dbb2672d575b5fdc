"""Process-level setup shared by every actor: device choice, thread counts, deterministic seeds.

Knows nothing about what the actor does.
"""

from __future__ import annotations

import hashlib
import os

import torch

from vzero.config import ActorResources


def actor_device(resources: ActorResources) -> str:
    """ "cuda" when the actor was given GPU share(s) and CUDA is usable, else "cpu"."""
    return "cuda" if resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def setup_threads(resources: ActorResources) -> int:
    """Match torch's intra-op threads to the CPUs Ray reserved, so colocated actors don't oversubscribe cores."""
    n = max(1, int(resources.num_cpus))
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    return n


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (e.g. base seed, step, rank): same inputs, same seed, on every host."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)
