"""Train the CAM classifier on image-level labels (spec 3), optionally with CDA copy-paste (spec 10.4).

With ``args.cam_aug`` (the CDA round) every step forwards ``batch/2`` originals and their ``batch/2``
composites (an object from the bank pasted into the image, label = union) with one averaged loss.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from misc import dist
from misc.checkpoint import load_checkpoint, save_checkpoint
from misc.io import atomic_write
from misc.optim import PolyOptimizer
from misc.pipeline import autocast, train_loader
from misc.weights import resolve_weights
from net.backbone import build_backbone
from net.cam import CAMNet
from voc12.dataset import ClassificationDataset, load_cls_labels, read_id_list

log = logging.getLogger("wsss")


def build_cam_net(args: argparse.Namespace, device: torch.device) -> CAMNet:
    """A CAM network on ImageNet weights (``args.backbone_weights``)."""
    backbone = build_backbone(args.backbone, resolve_weights(args.backbone_weights))
    return CAMNet(backbone).to(device)


def _dataset(args: argparse.Namespace, list_file: str, augment: bool) -> torch.utils.data.Dataset:
    labels = load_cls_labels(args.cls_labels)
    base = ClassificationDataset(
        args.voc12_root,
        read_id_list(list_file),
        labels,
        resize_long=tuple(args.cam_resize_long),
        crop_size=args.cam_crop_size,
        augment=augment,
        seed=args.seed,
    )
    if not args.cam_aug:
        return base
    from cda.bank import load_bank_index
    from cda.composite import CompositeDataset

    return CompositeDataset(
        base,
        load_bank_index(args.cda_bank_dir),
        seed=args.seed,
        max_size=args.cda_max_size,
        max_angle=args.cda_max_angle,
        mask_order=args.cda_mask_order,
    )


def _images_and_labels(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) images and (B, 20) labels; with CDA the composites are appended to the originals."""
    imgs, labels = batch["img"], batch["label"]
    if "img_aug" in batch:
        imgs = torch.cat([imgs, batch["img_aug"]])
        labels = torch.cat([labels, batch["label_aug"]])
    return imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def run(args: argparse.Namespace) -> None:
    device = dist.init(args.device)
    out = Path(args.cam_weights_name)
    dataset = _dataset(args, args.train_list, augment=True)
    # CDA keeps the image count per step: half originals, half their composites (spec 10.4).
    batch = args.cam_batch_size // 2 if args.cam_aug else args.cam_batch_size
    loader, sampler = train_loader(dataset, batch, args)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{args.train_list} has fewer images than one batch ({batch})")
    max_step = steps_per_epoch * args.cam_num_epoches
    if args.cam_aug and args.cda_schedule == "reference":
        # The reference sized the poly schedule for the full batch, so the LR bottoms out half-way.
        max_step = len(dataset) // args.cam_batch_size * args.cam_num_epoches

    model = build_cam_net(args, device)
    backbone_params, head_params = model.param_groups()
    lr, wd = args.cam_learning_rate, args.cam_weight_decay
    optimizer = PolyOptimizer(
        [{"params": backbone_params, "lr": lr}, {"params": head_params, "lr": 10 * lr}],
        lr=lr, weight_decay=wd, max_step=max_step, momentum=args.cam_momentum,
    )
    ckpt = out.with_suffix(".ckpt")
    start_epoch = 0
    if ckpt.is_file():
        start_epoch = load_checkpoint(ckpt, model, optimizer, None)
        log.info("resuming CAM training from %s (epoch %d)", ckpt, start_epoch)
    net = DistributedDataParallel(model) if dist.world_size() > 1 else model
    log.info("train_cam: %d images, %d steps/epoch x %d epochs (poly T=%d)%s", len(dataset), steps_per_epoch,
             args.cam_num_epoches, max_step, " with CDA composites" if args.cam_aug else "")

    for epoch in range(start_epoch, args.cam_num_epoches):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        model.train()
        bar = tqdm(loader, desc=f"train_cam {epoch + 1}/{args.cam_num_epoches}", disable=not dist.is_main())
        for batch_data in bar:
            imgs, labels = _images_and_labels(batch_data, device)
            with autocast(device, args.amp):
                logits = net(imgs)
            loss = F.multilabel_soft_margin_loss(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{dist.all_reduce_mean(loss.detach()).item():.4f}")
        if dist.is_main():
            log.info("epoch %d: train loss %.4f, val loss %.4f", epoch + 1, loss.item(), validate(model, args, device))
            save_checkpoint(ckpt, model=model, optimizer=optimizer, scaler=None, iteration=epoch + 1)
        dist.barrier()

    if dist.is_main():
        with atomic_write(out) as f:
            torch.save(model.state_dict(), f)
        ckpt.unlink(missing_ok=True)
        log.info("saved %s", out)


@torch.no_grad()
def validate(model: CAMNet, args: argparse.Namespace, device: torch.device) -> float:
    """Mean loss on the val list's top-left crops (the reference's only per-epoch check)."""
    model.eval()
    val_args = argparse.Namespace(**{**vars(args), "cam_aug": False})
    loader = torch.utils.data.DataLoader(
        _dataset(val_args, args.val_list, augment=False), batch_size=args.cam_batch_size, num_workers=args.num_workers
    )
    total, count = 0.0, 0
    for batch_data in loader:
        imgs, labels = _images_and_labels(batch_data, device)
        with autocast(device, args.amp):
            logits = model(imgs)
        total += F.multilabel_soft_margin_loss(logits.float(), labels, reduction="sum").item()
        count += len(imgs)
    model.train()
    return total / max(count, 1)
