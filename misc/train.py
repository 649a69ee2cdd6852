"""The one training loop of the pipeline (CAM methods, IRN, segmenters): stages, exact resume, logs, final save.

A run is a list of :class:`Stage` s; each stage builds its own optimiser, so a poly learning rate restarts
at every stage (PPL's progressive training), and may first reconfigure the model. The data order of
global step ``t`` depends on the seed and ``t`` only (``misc.pipeline.epoch_loader``), and checkpoints
hold the model, the stage's optimiser, the step and every rank's RNG states, so a run interrupted at any
checkpoint continues exactly as an uninterrupted one. Checkpoints are named with the fingerprint of the
run's inputs and settings, so only a run of the same configuration resumes from one; the final weights
are stamped with it (``misc.pipeline.up_to_date``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm

from misc import dist
from misc.checkpoint import gather_rng_states, load_checkpoint, read_checkpoint_file, save_checkpoint
from misc.errors import UserError
from misc.io import atomic_write
from misc.optim import PolyOptimizer
from misc.pipeline import TrainLog, epoch_loader, mark_done, up_to_date

log = logging.getLogger("wsss")

LossFn = Callable[[nn.Module, dict], dict[str, torch.Tensor]]


@dataclass
class Stage:
    """``steps`` optimiser steps with the optimiser ``make_optimizer(model)`` builds (its poly schedule
    spans the stage); ``prepare(model)``, if given, reconfigures the model before the stage's first step,
    on a resumed run too."""

    steps: int
    make_optimizer: Callable[[nn.Module], PolyOptimizer]
    prepare: Callable[[nn.Module], None] | None = None


@dataclass
class TrainData:
    """A training set cut into global batches of ``batch_size`` (split over the DDP ranks), epoch by epoch."""

    dataset: Dataset
    batch_size: int
    seed: int
    num_workers: int

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size


def train(
    model: nn.Module,
    stages: list[Stage],
    data: TrainData,
    out: Path,
    fp: str,
    losses: LossFn,
    *,
    ckpt_every: int | None = None,
    end_of_epoch: Callable[[int], None] | None = None,
) -> None:
    """Train ``model`` through ``stages`` on ``data``, resuming from ``out``'s checkpoint of fingerprint ``fp``.

    ``losses(net, batch)`` runs the (possibly DDP-wrapped) network on a batch and returns named scalar
    losses; the first one is optimised and all are logged (``log_path(out)`` once saved). A checkpoint is written
    every ``ckpt_every`` steps (default: at every epoch end) and at every stage end; ``end_of_epoch(epoch)``
    runs on rank 0 after each epoch (e.g. a validation pass). Does not save the final weights
    (:func:`save_trained`), so a step can still post-process the model.
    """
    world = dist.world_size()
    if data.batch_size % world:
        raise UserError(f"batch size {data.batch_size} is not divisible by the {world} processes")
    per_epoch = data.steps_per_epoch
    if per_epoch == 0:
        raise UserError(f"{len(data.dataset)} training images are fewer than one batch ({data.batch_size}): "
                        "lower the batch size or train on a longer list.")
    ckpt_every = ckpt_every or per_epoch
    ckpt = checkpoint_path(out, fp)
    bounds = [0]
    for stage in stages:
        bounds.append(bounds[-1] + stage.steps)
    total = bounds[-1]

    step, stage_index = 0, 0
    optimizer = None
    if ckpt.is_file():
        step, stage_index, optimizer = _resume(ckpt, model, stages, fp)
        log.info("resuming from %s (step %d of %d, stage %d of %d)", ckpt, step, total, stage_index + 1, len(stages))
    elif dist.is_main():
        # Checkpoints (and logs) of other settings can never resume this run: they would only fill the disk.
        for stale in [*out.parent.glob(f"{out.stem}.*.ckpt"), *out.parent.glob(f"{out.stem}.*.log.jsonl")]:
            if stale != log_path(out):
                stale.unlink()
    train_log = TrainLog(progress_log_path(out, fp), resume_step=step)
    net = DistributedDataParallel(model) if world > 1 else model
    model.train()
    bar = tqdm(total=total, initial=step, desc=out.stem, disable=not dist.is_main(), mininterval=2)
    while step < total:
        while step >= bounds[stage_index + 1]:
            stage_index += 1
            optimizer = None
        if optimizer is None:
            if stages[stage_index].prepare is not None:
                stages[stage_index].prepare(model)
            optimizer = stages[stage_index].make_optimizer(model)
        epoch, skip = divmod(step, per_epoch)
        stop = min(per_epoch, skip + bounds[stage_index + 1] - step)
        for batch in epoch_loader(data, epoch, skip, stop):
            values = losses(net, batch)
            optimizer.zero_grad(set_to_none=True)
            next(iter(values.values())).backward()
            optimizer.step()
            step += 1
            bar.update()
            bar.set_postfix(train_log.write(step, optimizer, values))
            epoch_done, stage_done = step % per_epoch == 0, step == bounds[stage_index + 1]
            if epoch_done and end_of_epoch is not None and dist.is_main():
                end_of_epoch(step // per_epoch - 1)
            if (step % ckpt_every == 0 or epoch_done or stage_done) and step < total:
                _checkpoint(ckpt, model, optimizer, step, stage_index, fp)
        model.train()
    bar.close()


def _checkpoint(path: Path, model: nn.Module, optimizer: PolyOptimizer, step: int, stage: int, fp: str) -> None:
    states = gather_rng_states()
    if dist.is_main():
        save_checkpoint(path, model=model, optimizer=optimizer, iteration=step,
                        extra={"stage": stage, "fingerprint": fp}, rng_states=states)
    dist.barrier()


def _resume(path: Path, model: nn.Module, stages: list[Stage], fp: str) -> tuple[int, int, PolyOptimizer]:
    """Restore ``path`` into ``model`` and a fresh optimiser of the checkpoint's stage."""
    ckpt = read_checkpoint_file(path, expect_extra={"fingerprint": fp})
    stage = int(ckpt["extra"]["stage"])
    if stages[stage].prepare is not None:
        stages[stage].prepare(model)
    optimizer = stages[stage].make_optimizer(model)
    return load_checkpoint(ckpt, path, model, optimizer), stage, optimizer


def checkpoint_path(out: Path, fp: str) -> Path:
    return out.with_suffix(f".{fp}.ckpt")


def progress_log_path(out: Path, fp: str) -> Path:
    """The log of a run in progress, beside its checkpoint; ``save_trained`` moves it to :func:`log_path`."""
    return out.with_suffix(f".{fp}.log.jsonl")


def log_path(out: Path) -> Path:
    """The training log of the saved weights ``out``: ``<out>.log.jsonl``."""
    return out.with_name(out.name + ".log.jsonl")


def already_trained(out: Path, fp: str, step: str) -> bool:
    """True, and logged, when ``out`` holds weights ``save_trained`` stamped with ``fp``: ``step`` has nothing to
    do."""
    if up_to_date(out, fp):
        log.info("%s: %s is up to date with its inputs; skipping (delete it to retrain)", step, out)
        return True
    return False


def save_trained(model: nn.Module, out: Path, fp: str) -> None:
    """Write the final weights atomically, stamp them with ``fp`` and drop the resume checkpoint (rank 0)."""
    if dist.is_main():
        with atomic_write(out) as f:
            torch.save(model.state_dict(), f)
        progress_log_path(out, fp).replace(log_path(out))
        mark_done(out, fp)
        checkpoint_path(out, fp).unlink(missing_ok=True)
        log.info("saved %s", out)
    dist.barrier()
