"""Train the inter-pixel relation network on the IR labels (spec 7), then estimate its mean shift (7.6).

The backbone is a fresh ImageNet one, entirely frozen (not the CAM weights, as the reference); only the
boundary and displacement heads train.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import dataset
from dataset.base import read_id_list
from dataset.labels import load_cls_labels
from dataset.samples import ClassificationDataset, SegmentationDataset
from methods.irn import TRAIN_RADIUS, batch_losses, build_irn
from misc import dist
from misc.indexing import get_path_index
from misc.optim import PolyOptimizer
from misc.pipeline import content_fingerprint, dir_fingerprint, fingerprint, require_files
from misc.train import Stage, TrainData, already_trained, save_trained, train
from net.irn import estimate_mean_shift

log = logging.getLogger("wsss")

TRAINING_SETTINGS = ("irn_crop_size", "irn_batch_size", "irn_num_epoches", "irn_learning_rate", "irn_weight_decay",
                     "irn_momentum", "backbone", "backbone_weights", "seed", "max_image_side")


def run(args: argparse.Namespace) -> None:
    device = dist.init(args.device)
    out = Path(args.irn_weights_name)
    ids = read_id_list(args.train_list)
    require_files(args.ir_label_out_dir, ids, ".png", "cam_to_ir_label")
    settings = {k: getattr(args, k) for k in TRAINING_SETTINGS}
    fp = fingerprint(settings=settings, labels=dir_fingerprint(args.ir_label_out_dir, "cam_to_ir_label"),
                     train=content_fingerprint(args.train_list), mean_shift=content_fingerprint(args.infer_list))
    if already_trained(out, fp, "train_irn"):
        return
    dist.seed_step(args.seed, "train_irn", args.variant)
    info = dataset.from_args(args)
    train_set = SegmentationDataset(info, ids, args.ir_label_out_dir, crop_size=args.irn_crop_size,
                                    scale_range=(0.5, 1.5), label_scale=0.25, seed=args.seed)
    data = TrainData(train_set, args.irn_batch_size, args.seed, args.num_workers)
    steps = data.steps_per_epoch * args.irn_num_epoches
    grid = (args.irn_crop_size + 3) // 4
    path_index = get_path_index(TRAIN_RADIUS, (grid, grid))
    model = build_irn(args).to(device)

    def optimizer(net: torch.nn.Module) -> PolyOptimizer:
        return PolyOptimizer(net.param_groups(args.irn_learning_rate), lr=args.irn_learning_rate,
                             weight_decay=args.irn_weight_decay, max_step=steps, momentum=args.irn_momentum)

    log.info("train_irn: %d images, %d steps/epoch x %d epochs", len(train_set), data.steps_per_epoch,
             args.irn_num_epoches)

    def losses(net: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return batch_losses(net, batch, path_index, device, args.amp)

    train(model, [Stage(steps, optimizer)], data, out, fp, losses)
    shift = estimate_mean_shift(model, _mean_shift_loader(args, info))
    log.info("train_irn: mean shift %s", shift.tolist())
    save_trained(model, out, fp)


def _mean_shift_loader(args: argparse.Namespace, info: dataset.DatasetInfo) -> DataLoader:
    """Top-left crops of this rank's share of the inference list (spec 7.6)."""
    ids = dist.shard(read_id_list(args.infer_list))
    images = ClassificationDataset(info, ids, load_cls_labels(args.cls_labels, info.num_classes),
                                   crop_size=args.irn_crop_size, augment=False)
    return DataLoader(images, batch_size=args.irn_batch_size, num_workers=args.num_workers)
