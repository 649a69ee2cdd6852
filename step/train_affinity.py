"""Train AffinityNet on the seeds of ``cam_to_ir_label`` (seam_affinitynet spec 3.5-3.8).

Crops of the photos (no rescale, as PSA), their seeds sampled onto the network's stride-8 grid; pair labels
within radius 5 (``misc.indexing.affinity_labels``) and PSA's loss. The backbone starts from ImageNet
(``--backbone_weights``) and trains except its stem; the new layers learn at 10x.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

import dataset
from dataset.base import read_id_list
from dataset.samples import SegmentationDataset
from methods.affinitynet import RADIUS, build_affinitynet
from misc import dist
from misc.indexing import affinity_labels, get_path_index
from misc.optim import PolyOptimizer
from misc.pipeline import autocast, content_fingerprint, dir_fingerprint, fingerprint, require_files
from misc.train import Stage, TrainData, already_trained, save_trained, train
from net.affinitynet import affinity_loss, source_affinity

log = logging.getLogger("wsss")

TRAINING_SETTINGS = ("aff_crop_size", "aff_batch_size", "aff_num_epoches", "aff_learning_rate", "aff_weight_decay",
                     "aff_momentum", "backbone", "backbone_weights", "seed", "max_image_side")


def run(args: argparse.Namespace) -> None:
    device = dist.init(args.device)
    out = Path(args.affinity_weights_name)
    ids = read_id_list(args.train_list)
    require_files(args.ir_label_out_dir, ids, ".png", "cam_to_ir_label")
    settings = {k: getattr(args, k) for k in TRAINING_SETTINGS}
    fp = fingerprint(settings=settings, labels=dir_fingerprint(args.ir_label_out_dir, "cam_to_ir_label"),
                     train=content_fingerprint(args.train_list))
    if already_trained(out, fp, "train_affinity"):
        return
    dist.seed_step(args.seed, "train_affinity", args.variant)
    model = build_affinitynet(args).to(device)
    grid = args.aff_crop_size // model.stride
    train_set = SegmentationDataset(dataset.from_args(args), ids, args.ir_label_out_dir, crop_size=args.aff_crop_size,
                                    scale_range=(1.0, 1.0), label_scale=1 / model.stride, seed=args.seed)
    data = TrainData(train_set, args.aff_batch_size, args.seed, args.num_workers)
    steps = data.steps_per_epoch * args.aff_num_epoches
    path_index = get_path_index(RADIUS, (grid, grid))

    def optimizer(net: torch.nn.Module) -> PolyOptimizer:
        return PolyOptimizer(net.param_groups(args.aff_learning_rate), lr=args.aff_learning_rate,
                             weight_decay=args.aff_weight_decay, max_step=steps, momentum=args.aff_momentum)

    def losses(net: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        labels = [affinity_labels(lab, path_index) for lab in batch["label"].numpy()]
        bg_pos, fg_pos, neg = (torch.stack(t).to(device) for t in zip(*labels, strict=True))
        with autocast(device, args.amp):
            feats = net(batch["img"].to(device, non_blocking=True))
        return affinity_loss(source_affinity(feats.float(), path_index), bg_pos, fg_pos, neg)

    log.info("train_affinity: %d images, %d steps/epoch x %d epochs, %d x %d grid", len(train_set),
             data.steps_per_epoch, args.aff_num_epoches, grid, grid)
    train(model, [Stage(steps, optimizer)], data, out, fp, losses)
    save_trained(model, out, fp)
