"""Device selection, torchrun/DDP set-up, sharding of image lists across ranks, and seeding.

A step calls ``init(args)`` once; it works unchanged for a plain ``python run_sample.py`` (one process)
and for ``torchrun --nproc_per_node=N run_sample.py`` (N processes, DDP).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist

from misc.errors import UserError

T = TypeVar("T")


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        torch_dist.barrier()


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present. Under torchrun each rank takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was given but PyTorch sees no CUDA device: use --device cpu.")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def init(device_name: str) -> torch.device:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA); return the device."""
    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shard(items: Sequence[T]) -> list[T]:
    """This rank's interleaved share of ``items`` (``items[rank::world]``); all of them with one process."""
    return list(items[rank() :: world_size()])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; ranks get different streams so DDP workers do not repeat each other."""
    seed = seed + rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_step(seed: int, *identity: str) -> None:
    """Seed every RNG for one step from the run seed and the step's identity (its name and round), so what a
    step draws (initial weights, dropout) does not depend on which steps ran before it in the process: a
    run resumed after an interruption draws exactly what the uninterrupted run drew."""
    digest = hashlib.sha256(json.dumps([seed, *identity]).encode()).digest()
    seed_everything(int.from_bytes(digest[:4], "little"))


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (identity with one process)."""
    if world_size() > 1:
        value = value.clone()
        torch_dist.all_reduce(value)
        value /= world_size()
    return value


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows (n_r, ...)`` concatenated in rank order (``rows`` itself with one process).

    The row counts may differ between ranks; the trailing shape and dtype must agree. A collective: every rank
    calls it, with what it has (possibly no row), so state updated from the result stays identical everywhere.
    """
    world = world_size()
    if world == 1:
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch_dist.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    padded = rows.new_zeros((most, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch_dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts, strict=True)])


def broadcast_(value: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``value`` in place with rank ``src``'s (a no-op with one process); returns it."""
    if world_size() > 1:
        torch_dist.broadcast(value, src)
    return value
