"""Resumable training checkpoints: model, optimiser, step, run metadata and every RNG state.

Restoring all of them makes an interrupted run continue exactly as an uninterrupted one would (same
next-step loss), provided the data order is a function of the step (``misc.pipeline.epoch_loader``).
Checkpoints hold tensors and plain values only (the RNG states are converted), so they load with
``torch.load(weights_only=True)``: a work dir from someone else cannot run code.

Under DDP the caller writes on rank 0 only. To make the resume exact per rank, every rank first calls
the collective :func:`gather_rng_states` and rank 0 passes the result as ``rng_states``.
:func:`load_checkpoint` is called by every rank and restores its own states.
"""

from __future__ import annotations

import os
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
    """This process's Python, NumPy, torch CPU and (if used) current-CUDA-device RNG states, as tensors and
    plain values."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
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
    iteration: int,
    extra: dict[str, Any] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> None:
    """Atomically write a resumable checkpoint (the caller decides which rank writes).

    ``iteration`` counts completed steps; ``extra`` holds plain values describing the run (its stage, its
    settings' fingerprint) that :func:`load_checkpoint` can check; ``rng_states`` comes from
    :func:`gather_rng_states` (default: this process's states only).
    """
    ckpt = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        "rng": rng_states if rng_states is not None else [rng_state()],
        "extra": extra or {},
    }
    with atomic_write(path) as f:
        torch.save(ckpt, f)


def read_checkpoint_file(path: str | os.PathLike, expect_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint at ``path`` (``weights_only``), after checking that its ``extra`` entries equal
    ``expect_extra`` (resuming with other settings would silently mix two runs)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load fails in many ways on a file that is no checkpoint
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}): delete it to start over.") from e
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "iteration", "rng", "extra"} <= ckpt.keys():
        raise UserError(f"{path} is not a resume checkpoint of this pipeline: delete it to start over.")
    for key, value in (expect_extra or {}).items():
        if ckpt["extra"].get(key) != value:
            raise UserError(
                f"checkpoint {path} was written with {key}={ckpt['extra'].get(key)!r}, this run has "
                f"{key}={value!r}: restore the setting to resume, or delete the checkpoint to start over."
            )
    return ckpt


def load_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> int:
    """Restore a checkpoint read by :func:`read_checkpoint_file` into ``model`` (and ``optimizer``), and
    this rank's RNG states; return its iteration.

    If the world size changed, ranks fall back to rank 0's RNG states (the run then continues, but not
    bit-exactly).
    """
    try:
        unwrap(model).load_state_dict(ckpt["model"])
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"checkpoint {path} does not fit this model ({e}): delete it to start over.") from e
    states = ckpt["rng"]
    set_rng_state(states[dist.rank()] if len(states) == dist.world_size() else states[0])
    return int(ckpt["iteration"])
