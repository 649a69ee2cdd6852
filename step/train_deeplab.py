"""Train DeepLab on the pseudo masks of a round, or on ground truth for the upper bound (spec 11.2).

Iteration-based and exactly resumable: the data order of iteration ``t`` is a function of the seed and
``t`` only (epoch ``t // steps_per_epoch`` permutes the ids with a seeded ``DistributedSampler``, and the
dataset augments each sample from ``(seed, epoch, index)``), and the checkpoint holds the model,
optimiser (momentum buffers, poly step), iteration and every rank's RNG states (dropout).
Global batch ``b`` is split over the DDP processes; step ``t`` sees the same images for any process count.
AMP is bf16 autocast (``misc.pipeline.autocast``), whose fp32-sized exponent needs no GradScaler.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from misc import dist
from misc.checkpoint import gather_rng_states, load_checkpoint, save_checkpoint
from misc.errors import UserError
from misc.io import atomic_write
from misc.optim import PolyOptimizer
from misc.pipeline import autocast, dir_fingerprint, fingerprint, mark_done, up_to_date
from misc.weights import resolve_weights
from net.deeplab import DeepLab, build_deeplab
from voc12.dataset import IGNORE, SegmentationDataset, VOCLayout, read_id_list

log = logging.getLogger("wsss")

# DeepLab's random scale range (spec 11.2 draws from {0.5, ..., 1.5}; a continuous range as for IRN).
SCALE_RANGE = (0.5, 1.5)


def label_dir(args: argparse.Namespace, ids: list[str]) -> Path:
    """Where the training masks of ``ids`` live; ``UserError`` if any is missing.

    Pseudo masks: ``args.sem_seg_out_dir``, or with ``args.deeplab_ignore_uncertain`` the same masks with
    their uncertain background ignored (``args.sem_seg_ignore_dir``, ``misc.labels.ignore_uncertain_background``):
    an object part the walk left just below the threshold is background in the complete masks, and DeepLab
    learns to shrink every object (docs/benchmarks.md measures it on the demo). Ground truth
    (``args.deeplab_gt``): ``SegmentationClassAug`` (SBD + VOC, covers train_aug) if present, else VOC's
    ``SegmentationClass``.
    """
    if args.deeplab_gt:
        root = Path(args.voc12_root)
        out = root / "SegmentationClassAug"
        out = out if out.is_dir() else root / "SegmentationClass"
        fix = "train on a list whose ids have ground-truth masks, or add SegmentationClassAug (SBD)"
    else:
        out = Path(args.sem_seg_ignore_dir if args.deeplab_ignore_uncertain else args.sem_seg_out_dir)
        fix = "run make_sem_seg_labels with infer_list = train_list first"
        if args.deeplab_ignore_uncertain:
            fix += " (with --deeplab_ignore_uncertain true)"
    missing = [i for i in ids if not (out / f"{i}.png").is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(ids)} training masks are missing in {out} (first: {missing[0]}.png): {fix}."
        )
    return out


def epoch_loader(
    dataset: SegmentationDataset, epoch: int, skip: int, steps: int, rank_batch: int, args: argparse.Namespace
) -> DataLoader:
    """This rank's batches ``skip..steps-1`` of ``epoch``.

    One seeded permutation per epoch, dealt round-robin to the ranks (``perm[r::world]``), so global batch
    ``k`` is ``perm[k*b:(k+1)*b]`` for any number of processes. Skipping the batches done before a resume
    costs nothing: the indices are cut before any image is read.
    """
    sampler = DistributedSampler(
        dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=args.seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    indices = list(sampler)[skip * rank_batch : steps * rank_batch]
    return DataLoader(
        dataset,
        batch_size=rank_batch,
        sampler=indices,
        num_workers=args.num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        # The workers' base seed comes from this generator, not from the global RNG, so building a loader
        # mid-epoch after a resume leaves the global RNG (dropout) exactly where the original run had it.
        generator=torch.Generator().manual_seed(args.seed),
    )


def build_model(args: argparse.Namespace, backbone_weights: str | os.PathLike | None) -> DeepLab:
    """DeepLab of ``args.deeplab_arch`` on ``args.deeplab_backbone`` (``None`` weights: random init)."""
    return build_deeplab(
        args.deeplab_arch, args.deeplab_backbone, backbone_weights, args.deeplab_output_stride, num_classes=21
    )


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, C, H, W) logits against (B, H, W) labels, ignoring 255.

    The mean over labelled pixels, and 0 (not NaN) for a batch whose crops are all ignore.
    """
    valid = (target != IGNORE).sum().clamp(min=1)
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum") / valid


def run(args: argparse.Namespace) -> None:
    device = dist.init(args.device)
    out_dir = Path(args.deeplab_dir)
    ckpt_path, final_path = out_dir / "checkpoint.pth", out_dir / "deeplab.pth"
    VOCLayout(args.voc12_root).check()
    ids = read_id_list(args.deeplab_train_list or args.train_list)
    labels = label_dir(args, ids)
    world, batch, iters = dist.world_size(), args.deeplab_batch_size, args.deeplab_iters
    if batch % world:
        raise UserError(f"--deeplab_batch_size {batch} is not divisible by the {world} processes.")
    rank_batch = batch // world
    steps_per_epoch = len(ids) // batch
    if steps_per_epoch == 0:
        raise UserError(f"{len(ids)} training images are fewer than one batch (--deeplab_batch_size {batch}).")
    dataset = SegmentationDataset(
        args.voc12_root, ids, labels, crop_size=args.deeplab_crop_size, scale_range=SCALE_RANGE,
        seed=args.seed, augment=True,
    )

    dist.seed_everything(args.seed)
    model = build_model(args, resolve_weights(args.deeplab_weights))
    if world > 1 and device.type == "cuda":
        # SyncBatchNorm (CUDA only): the v3+ head's statistics over the global batch. Only the head:
        # converting the whole model would turn the backbone's FixedBatchNorm2d (a BatchNorm2d subclass)
        # into a statistics-computing SyncBatchNorm.
        model.head = nn.SyncBatchNorm.convert_sync_batchnorm(model.head)
    model.to(device)
    backbone_params, head_params = model.param_groups()
    lr = args.deeplab_learning_rate
    optimizer = PolyOptimizer(
        [{"params": backbone_params, "lr": lr}, {"params": head_params, "lr": 10 * lr}],
        lr=lr, weight_decay=args.deeplab_weight_decay, max_step=iters, momentum=0.9,
    )
    settings = {
        "arch": args.deeplab_arch, "backbone": args.deeplab_backbone, "output_stride": args.deeplab_output_stride,
        "iters": iters, "batch_size": batch, "lr": lr, "weight_decay": args.deeplab_weight_decay,
        "crop_size": args.deeplab_crop_size, "labels": str(labels), "num_images": len(ids), "seed": args.seed,
    }
    if not args.deeplab_gt:
        # New pseudo masks under the same path must retrain: the folder's fingerprint changes with them.
        settings["labels_fingerprint"] = dir_fingerprint(labels, "make_sem_seg_labels")
    fp = fingerprint(**settings)
    if up_to_date(final_path, fp):
        log.info("train_deeplab: %s is up to date with its inputs; skipping (delete it to retrain)", final_path)
        return
    it = 0
    if ckpt_path.is_file():
        it = load_checkpoint(ckpt_path, model, optimizer, None, expect_extra=settings)
        if dist.is_main():
            log.info("train_deeplab: resuming from %s at iteration %d", ckpt_path, it)
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    if dist.is_main():
        log.info("train_deeplab: DeepLab-%s/%s OS%d on %d images (%s), %d iterations x batch %d", args.deeplab_arch,
                 args.deeplab_backbone, args.deeplab_output_stride, len(ids), labels, iters, batch)

    model.train()
    bar = tqdm(total=iters, initial=it, desc="train_deeplab", disable=not dist.is_main(), mininterval=2)
    while it < iters:
        epoch, skip = divmod(it, steps_per_epoch)
        for data in epoch_loader(dataset, epoch, skip, steps_per_epoch, rank_batch, args):
            imgs = data["img"].to(device, non_blocking=True)
            target = data["label"].to(device, non_blocking=True)
            with autocast(device, args.amp):
                logits = net(imgs)
            loss = segmentation_loss(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            it += 1
            shown = dist.all_reduce_mean(loss.detach()).item()
            if dist.is_main():
                log.debug("train_deeplab iteration %d loss %.9g", it, shown)
            bar.update()
            bar.set_postfix(loss=f"{shown:.4f}")
            if args.deeplab_ckpt_every > 0 and it % args.deeplab_ckpt_every == 0 and it < iters:
                states = gather_rng_states()
                if dist.is_main():
                    save_checkpoint(ckpt_path, model=model, optimizer=optimizer, scaler=None, iteration=it,
                                    extra=settings, rng_states=states)
                    log.info("train_deeplab: iteration %d/%d, loss %.4f, checkpoint %s", it, iters, shown, ckpt_path)
            if it == iters:
                break
    bar.close()

    if dist.is_main():
        with atomic_write(final_path) as f:
            torch.save(model.state_dict(), f)
        mark_done(final_path, fp)
        # The final weights supersede the resume point (twice their size with the momentum buffers).
        ckpt_path.unlink(missing_ok=True)
        log.info("train_deeplab: saved %s", final_path)
    dist.barrier()
