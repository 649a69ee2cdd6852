"""Resumable training checkpoints: model, optimiser, GradScaler, iteration and every RNG state.

Restoring all of them makes an interrupted run continue exactly as an uninterrupted one would (same
next-step loss), provided the data order is a function of the iteration (the training steps derive it
from the seed and epoch, not from a global RNG).

Under DDP the caller writes on rank 0 only. To make the resume exact per rank, every rank first calls
the collective :func:`gather_rng_states` and rank 0 passes the result as ``rng_states``; without it only
the writer's states are stored. ``load_checkpoint`` is called by every rank and restores its own states.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from misc import dist
from misc.errors import UserError
from misc.io import atomic_write


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and (if present) current-CUDA-device RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, indexed by rank (collective: call on all ranks)."""
    if dist.world_size() == 1:
        return [rng_state()]
    states: list[Any] = [None] * dist.world_size()
    torch_dist.all_gather_object(states, rng_state())
    return states


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    iteration: int,
    extra: dict[str, Any] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> None:
    """Atomically write a resumable checkpoint (the caller decides which rank writes).

    ``iteration`` counts completed steps (or epochs: the caller's unit); ``extra`` holds plain values
    describing the run (e.g. its settings) that :func:`load_checkpoint` can check; ``rng_states`` comes
    from :func:`gather_rng_states` (default: this process's states only).
    """
    ckpt = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iteration": iteration,
        "rng": rng_states if rng_states is not None else [rng_state()],
        "extra": extra or {},
    }
    with atomic_write(path) as f:
        torch.save(ckpt, f)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
    *,
    expect_extra: dict[str, Any] | None = None,
) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; return its iteration.

    ``expect_extra``: values that must equal the checkpoint's ``extra`` entries (otherwise ``UserError``:
    resuming with other settings would silently mix two runs). Each rank restores its own RNG states; if
    the world size changed, ranks fall back to rank 0's (the run then continues, but not bit-exactly).
    """
    path = Path(path)
    try:
        # weights_only=False because the RNG states are Python/NumPy objects. Safe only because this
        # loads checkpoints this code wrote itself; never point it at files from elsewhere.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"checkpoint {path} is unreadable ({e}): delete it to start over.") from e
    for key, value in (expect_extra or {}).items():
        if ckpt["extra"].get(key) != value:
            raise UserError(
                f"checkpoint {path} was written with {key}={ckpt['extra'].get(key)!r}, this run has "
                f"{key}={value!r}: restore the setting to resume, or delete the checkpoint to start over."
            )
    try:
        unwrap(model).load_state_dict(ckpt["model"])
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"checkpoint {path} does not fit this model ({e}): delete it to start over.") from e
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    states = ckpt["rng"]
    set_rng_state(states[dist.rank()] if len(states) == dist.world_size() else states[0])
    return int(ckpt["iteration"])
