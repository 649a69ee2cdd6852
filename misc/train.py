"""The epoch loop shared by the CAM and IRN training steps: resume, per-step log, checkpoints, final save.

Checkpoints are named with the fingerprint of the run's inputs and settings, so only a run of the same
configuration resumes from one; the final weights are stamped with it (``misc.pipeline.up_to_date``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from misc import dist
from misc.checkpoint import load_checkpoint, save_checkpoint
from misc.io import atomic_write
from misc.optim import PolyOptimizer
from misc.pipeline import TrainLog, mark_done

log = logging.getLogger("wsss")


def train_epochs(
    model: nn.Module,
    optimizer: PolyOptimizer,
    loader: DataLoader,
    epochs: int,
    out: Path,
    fp: str,
    losses: Callable[[nn.Module, dict], dict[str, torch.Tensor]],
    end_of_epoch: Callable[[int], None] | None = None,
) -> None:
    """Train ``model`` for ``epochs`` epochs, resuming from ``out``'s checkpoint of fingerprint ``fp``.

    ``losses(net, batch)`` runs the (possibly DDP-wrapped) network on a batch and returns named scalar
    losses; the first one is optimised. ``end_of_epoch(epoch)`` runs on rank 0 after each epoch (e.g. a
    validation pass). The loader's sampler and dataset get ``set_epoch`` so each epoch is reproducible.
    """
    ckpt = checkpoint_path(out, fp)
    start_epoch = load_checkpoint(ckpt, model, optimizer, None) if ckpt.is_file() else 0
    if start_epoch:
        log.info("resuming from %s (epoch %d of %d)", ckpt, start_epoch, epochs)
    train_log = TrainLog(out, resume=start_epoch > 0)
    net = DistributedDataParallel(model) if dist.world_size() > 1 else model
    for epoch in range(start_epoch, epochs):
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        model.train()
        bar = tqdm(loader, desc=f"{out.stem} {epoch + 1}/{epochs}", disable=not dist.is_main())
        for batch in bar:
            values = losses(net, batch)
            optimizer.zero_grad(set_to_none=True)
            next(iter(values.values())).backward()
            optimizer.step()
            bar.set_postfix(train_log.write(optimizer.global_step, optimizer, values))
        if dist.is_main():
            if end_of_epoch is not None:
                end_of_epoch(epoch)
            save_checkpoint(ckpt, model=model, optimizer=optimizer, scaler=None, iteration=epoch + 1)
        dist.barrier()


def checkpoint_path(out: Path, fp: str) -> Path:
    return out.with_suffix(f".{fp}.ckpt")


def save_trained(model: nn.Module, out: Path, fp: str) -> None:
    """Write the final weights atomically, stamp them with ``fp`` and drop the resume checkpoint (rank 0)."""
    if dist.is_main():
        with atomic_write(out) as f:
            torch.save(model.state_dict(), f)
        mark_done(out, fp)
        checkpoint_path(out, fp).unlink(missing_ok=True)
        log.info("saved %s", out)
    dist.barrier()
