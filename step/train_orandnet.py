"""Train ORANDNet's FCN (orandnet spec 6.2): each class's OR map in, its AND map the soft target.

One image per iteration (per process; DDP averages over processes) from the training list, shuffled, no
augmentation, the maps at full resolution as ``combine_cams`` stored them; SGD at ``--orandnet_learning_rate``
with poly 0.9 over ``--orandnet_iters`` and no momentum or weight decay (what the reference's positional
weight-decay quirk amounts to, spec 11.7). Through ``misc.train.train``: exact resume from a checkpoint
every 500 iterations. Writes ``<round>/sess/orandnet.pth``.
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn

from dataset.base import read_id_list
from methods.orand import OrAndPairs, build_orandnet, fcn_per_class, orand_loss, orand_paths
from misc import dist
from misc.optim import PolyOptimizer
from misc.pipeline import (
    autocast,
    content_fingerprint,
    dir_fingerprint,
    fingerprint,
    require_files,
    weights_fingerprint,
)
from misc.train import Stage, TrainData, already_trained, save_trained, train

log = logging.getLogger("wsss")

CKPT_EVERY = 500  # the reference's 5000 iterations are half a VOC epoch: an epoch-end checkpoint never comes


def run(args: argparse.Namespace) -> None:
    device = dist.init(args.device)
    paths = orand_paths(args)
    ids = read_id_list(args.train_list)
    for kind in ("or", "and"):
        require_files(paths[kind], ids, ".npz", "combine_cams")
    out = paths["weights"]
    fp = fingerprint(or_cams=dir_fingerprint(paths["or"], "combine_cams"),
                     and_cams=dir_fingerprint(paths["and"], "combine_cams"), iters=args.orandnet_iters,
                     lr=args.orandnet_learning_rate, loss=args.orandnet_loss, width=args.orandnet_width,
                     weights=weights_fingerprint(args.orandnet_weights), seed=args.seed,
                     train=content_fingerprint(args.train_list))
    if already_trained(out, fp, "train_orandnet"):
        return
    dist.seed_step(args.seed, "train_orandnet", args.variant)
    model = build_orandnet(args).to(device)
    data = TrainData(OrAndPairs(ids, paths["or"], paths["and"]), dist.world_size(), args.seed, args.num_workers)

    def optimizer(net: nn.Module) -> PolyOptimizer:
        lr = args.orandnet_learning_rate
        return PolyOptimizer([{"params": list(net.parameters()), "lr": lr}], lr=lr, weight_decay=0.0,
                             max_step=args.orandnet_iters, momentum=0.0)

    def losses(net: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        or_maps = batch["or"][0].to(device, non_blocking=True)  # (k, H, W): the batch holds one image
        target = batch["and"][0].to(device, non_blocking=True)
        with autocast(device, args.amp):
            logits = fcn_per_class(net, or_maps)
        return {"loss": orand_loss(logits.float(), target, args.orandnet_loss)}

    log.info("train_orandnet: FCN-8s (width %g) on %d images, %d iterations", args.orandnet_width, len(ids),
             args.orandnet_iters)
    train(model, [Stage(args.orandnet_iters, optimizer)], data, out, fp, losses, ckpt_every=CKPT_EVERY)
    save_trained(model, out, fp)
