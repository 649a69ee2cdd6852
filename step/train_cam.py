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

from misc import dist
from misc.optim import PolyOptimizer
from misc.pipeline import autocast, content_fingerprint, fingerprint, train_loader, up_to_date
from misc.train import save_trained, train_epochs
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


TRAINING_SETTINGS = ("cam_batch_size", "cam_num_epoches", "cam_learning_rate", "cam_weight_decay", "cam_momentum",
                     "cam_crop_size", "cam_resize_long", "cam_aug", "cda_max_size", "cda_max_angle",
                     "cda_mask_order", "cda_schedule", "backbone", "backbone_weights", "seed")


def _fingerprint(args: argparse.Namespace) -> str:
    """What the trained weights depend on: training settings, lists, labels and (with CDA) the object bank.

    Paths and evaluation-only settings are left out, so moving a work dir or changing a threshold keeps them.
    """
    inputs = {"labels": content_fingerprint(args.cls_labels), "train": content_fingerprint(args.train_list)}
    if args.cam_aug:
        inputs["bank"] = content_fingerprint(Path(args.cda_bank_dir) / "index.json")
    return fingerprint(settings={k: getattr(args, k) for k in TRAINING_SETTINGS}, inputs=inputs)


def batch_losses(net: torch.nn.Module, batch: dict, device: torch.device, amp: bool) -> dict[str, torch.Tensor]:
    """Multilabel soft-margin loss of a batch (originals, plus composites with CDA), averaged over images."""
    imgs, labels = _images_and_labels(batch, device)
    with autocast(device, amp):
        logits = net(imgs)
    return {"loss": F.multilabel_soft_margin_loss(logits.float(), labels)}


def run(args: argparse.Namespace) -> None:
    device = dist.init(args.device)
    out = Path(args.cam_weights_name)
    fp = _fingerprint(args)
    if up_to_date(out, fp):
        log.info("train_cam: %s is up to date with its inputs; skipping (delete it to retrain)", out)
        return
    dataset = _dataset(args, args.train_list, augment=True)
    # CDA keeps the image count per step: half originals, half their composites (spec 10.4).
    batch = args.cam_batch_size // 2 if args.cam_aug else args.cam_batch_size
    loader = train_loader(dataset, batch, args)
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
    log.info("train_cam: %d images, %d steps/epoch x %d epochs (poly T=%d)%s", len(dataset), steps_per_epoch,
             args.cam_num_epoches, max_step, " with CDA composites" if args.cam_aug else "")

    def losses(net: torch.nn.Module, batch_data: dict) -> dict[str, torch.Tensor]:
        return batch_losses(net, batch_data, device, args.amp)

    def report(epoch: int) -> None:
        log.info("epoch %d: val loss %.4f", epoch + 1, validate(model, args, device))

    train_epochs(model, optimizer, loader, args.cam_num_epoches, out, fp, losses, report)
    save_trained(model, out, fp)


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
