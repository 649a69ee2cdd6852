"""Train the CAM method's classifier on image-level labels (spec 3), optionally with CDA copy-paste (spec 10.4).

Any CAM method (``--cam_method``, ``methods.CAM_METHODS``) trains here. With ``args.cam_aug`` (the CDA round)
every step forwards ``batch/2`` originals and their ``batch/2`` composites (an object from the bank pasted
into the image, label = union) with one averaged loss.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

import dataset
import methods
from dataset.base import read_id_list
from dataset.labels import load_cls_labels
from misc import dist
from misc.pipeline import autocast, content_fingerprint, fingerprint
from misc.train import TrainData, already_trained, save_trained, train

log = logging.getLogger("wsss")

TRAINING_SETTINGS = ("cam_method", "cam_batch_size", "cam_num_epoches", "cam_learning_rate", "cam_weight_decay",
                     "cam_momentum", "cam_crop_size", "cam_resize_long", "cam_aug", "cda_max_size", "cda_max_angle",
                     "cda_mask_order", "cda_schedule", "backbone", "backbone_weights", "seed", "max_image_side")


def _dataset(args: argparse.Namespace, list_file: str, augment: bool, composites: bool) -> torch.utils.data.Dataset:
    info = dataset.from_args(args)
    base = methods.cam_method(args).classification_set(args, info, read_id_list(list_file),
                                                       load_cls_labels(args.cls_labels, info.num_classes), augment)
    if not composites:
        return base
    from cda.bank import load_bank_index
    from cda.composite import CompositeDataset

    return CompositeDataset(
        base,
        load_bank_index(args.cda_bank_dir, info),
        seed=args.seed,
        max_size=args.cda_max_size,
        max_angle=args.cda_max_angle,
        mask_order=args.cda_mask_order,
    )


def _images_and_labels(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) images and (B, C) labels; with CDA the composites are appended to the originals."""
    imgs, labels = batch["img"], batch["label"]
    if "img_aug" in batch:
        imgs = torch.cat([imgs, batch["img_aug"]])
        labels = torch.cat([labels, batch["label_aug"]])
    return imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def _fingerprint(args: argparse.Namespace) -> str:
    """What the trained weights depend on: training settings, lists, labels and (with CDA) the object bank.

    Paths and evaluation-only settings are left out, so moving a work dir or changing a threshold keeps them.
    """
    method = methods.cam_method(args)
    inputs = {"labels": content_fingerprint(args.cls_labels), "train": content_fingerprint(args.train_list)}
    if args.cam_aug:
        inputs["bank"] = content_fingerprint(Path(args.cda_bank_dir) / "index.json")
    settings = {k: getattr(args, k) for k in (*TRAINING_SETTINGS, *method.settings)}
    return fingerprint(settings=settings, inputs=inputs)


def run(args: argparse.Namespace) -> None:
    device = dist.init(args.device)
    method = methods.cam_method(args)
    out = Path(args.cam_weights_name)
    fp = _fingerprint(args)
    if already_trained(out, fp, "train_cam"):
        return
    dist.seed_step(args.seed, "train_cam", args.variant)
    train_set = _dataset(args, args.train_list, augment=True, composites=args.cam_aug)
    # CDA keeps the image count per step: half originals, half their composites (spec 10.4).
    data = TrainData(train_set, args.cam_batch_size // 2 if args.cam_aug else args.cam_batch_size, args.seed,
                     args.num_workers)
    steps_per_epoch = data.steps_per_epoch

    def poly_length(steps: int) -> int:
        if args.cam_aug and args.cda_schedule == "reference" and steps_per_epoch:
            # The reference sized the poly schedule for the full batch, so the LR bottoms out half-way.
            return steps * (len(train_set) // args.cam_batch_size) // steps_per_epoch
        return steps

    model = method.build(args, dataset.from_args(args).num_classes).to(device)
    stages = method.stages(args, steps_per_epoch, poly_length)
    log.info("train_cam: %s, %d images, %d steps/epoch, %d steps in %d stage(s)%s", method.name, len(train_set),
             steps_per_epoch, sum(s.steps for s in stages), len(stages), " with CDA composites" if args.cam_aug else "")

    def losses(net: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        imgs, labels = _images_and_labels(batch, device)
        with autocast(device, args.amp):
            return method.batch_losses(net, batch, imgs, labels)

    def report(epoch: int) -> None:
        log.info("epoch %d: val loss %.4f", epoch + 1, validate(model, args, device))

    train(model, stages, data, out, fp, losses, end_of_epoch=report)
    save_trained(model, out, fp)


@torch.no_grad()
def validate(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> float:
    """Mean classification loss on the val list's top-left crops (the reference's only per-epoch check)."""
    model.eval()
    loader = torch.utils.data.DataLoader(_dataset(args, args.val_list, augment=False, composites=False),
                                         batch_size=args.cam_batch_size, num_workers=args.num_workers)
    total, count = 0.0, 0
    for batch_data in loader:
        imgs, labels = _images_and_labels(batch_data, device)
        with autocast(device, args.amp):
            logits = model(imgs)
        total += F.multilabel_soft_margin_loss(logits.float(), labels, reduction="sum").item()
        count += len(imgs)
    model.train()
    return total / max(count, 1)
