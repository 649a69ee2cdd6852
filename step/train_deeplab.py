"""Train the segmenter (DeepLab) on the pseudo masks of a round, or on ground truth for the upper bound (spec 11.2).

Iteration-based and exactly resumable through ``misc.train.train``: the data order of iteration ``t`` is a
function of the seed and ``t`` only, and a checkpoint every ``--deeplab_ckpt_every`` iterations holds the
model, optimiser, iteration and every rank's RNG states (dropout). Global batch ``b`` is split over the DDP
processes; step ``t`` sees the same images for any process count. ``--deeplab_scale_schedule`` (orandnet
spec 8, ``misc.curriculum``) scales the images of step ``t`` by its phase's factor, also a function of ``t``.
AMP is bf16 autocast (``misc.pipeline.autocast``), whose fp32-sized exponent needs no GradScaler.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

import dataset
import methods
from dataset.base import read_id_list
from dataset.samples import SegmentationDataset
from misc import dist
from misc.curriculum import ScaleSchedule, ScheduledScale, parse_scale_schedule
from misc.errors import UserError
from misc.optim import PolyOptimizer
from misc.pipeline import content_fingerprint, dir_fingerprint, fingerprint, require_files
from misc.train import Stage, TrainData, already_trained, save_trained, train
from misc.weights import resolve_weights

log = logging.getLogger("wsss")

# DeepLab's random scale range (spec 11.2 draws from {0.5, ..., 1.5}; a continuous range as for IRN).
SCALE_RANGE = (0.5, 1.5)


def label_dir(args: argparse.Namespace, ids: list[str]) -> Path | None:
    """Where the training masks of ``ids`` live (None: the dataset's ground truth); ``UserError`` if any is
    missing.

    Pseudo masks: ``args.sem_seg_out_dir``, or with ``args.deeplab_ignore_uncertain`` the same masks with
    their uncertain background ignored (``args.sem_seg_ignore_dir``, ``misc.labels.ignore_uncertain_background``):
    an object part the walk left just below the threshold is background in the complete masks, and DeepLab
    learns to shrink every object (docs/benchmarks.md measures it on the demo). Ground truth
    (``args.deeplab_gt``): ``SegmentationClassAug`` (SBD + VOC, covers train_aug) if present, else VOC's
    ``SegmentationClass`` (the dataset's ``seg_class_aug`` / ``seg_class`` folders).
    """
    if args.deeplab_gt:
        info = dataset.from_args(args)
        missing = [i for i in ids if not info.has_training_mask(i)]
        if missing:
            raise UserError(f"{len(missing)} of {len(ids)} training images have no ground truth (first: "
                            f"{info.seg_class(missing[0])}): train on a list whose ids have masks (VOC: or add "
                            "SegmentationClassAug, SBD).")
        return None
    out = Path(args.sem_seg_ignore_dir if args.deeplab_ignore_uncertain else args.sem_seg_out_dir)
    fix = "run make_sem_seg_labels with infer_list = train_list first"
    if args.deeplab_ignore_uncertain:
        fix += " (with --deeplab_ignore_uncertain true)"
    require_files(out, ids, ".png", "make_sem_seg_labels", fix)
    return out


def run(args: argparse.Namespace) -> None:
    device = dist.init(args.device)
    info = dataset.from_args(args).check()
    segmenter = methods.segmenter(args)
    out = Path(args.deeplab_dir) / "deeplab.pth"
    ids = read_id_list(args.deeplab_train_list)
    # A segmenter with labels of its own (AGMM's points / scribbles) brings its training set; else the masks.
    own = segmenter.training_set(args, info, ids)
    labels = label_dir(args, ids) if own is None else None
    settings = {"segmenter": args.segmenter, **{k: getattr(args, k) for k in segmenter.settings},
                "iters": args.deeplab_iters, "batch_size": args.deeplab_batch_size, "lr": args.deeplab_learning_rate,
                "weight_decay": args.deeplab_weight_decay, "crop_size": args.deeplab_crop_size,
                "weights": args.deeplab_weights, "seed": args.seed, "max_image_side": args.max_image_side,
                "train": content_fingerprint(args.deeplab_train_list)}
    schedule = parse_scale_schedule(getattr(args, "deeplab_scale_schedule", None))
    if schedule is not None:  # only then: runs without a curriculum keep their fingerprint (and weights)
        settings["scale_schedule"] = schedule
    # New pseudo masks under the same path must retrain: the folder's fingerprint changes with them.
    fp = fingerprint(**settings, labels=own[1] if own is not None else "gt" if labels is None
                     else dir_fingerprint(labels, "make_sem_seg_labels"))
    if already_trained(out, fp, "train_deeplab"):
        return
    dist.seed_step(args.seed, "train_deeplab", args.variant)
    model = segmenter.build(args, info.num_labels, resolve_weights(args.deeplab_weights))
    if dist.world_size() > 1 and device.type == "cuda":
        # SyncBatchNorm (CUDA only): the v3+ head's statistics over the global batch. Only the head:
        # converting the whole model would turn the backbone's FixedBatchNorm2d (a BatchNorm2d subclass)
        # into a statistics-computing SyncBatchNorm.
        model.head = nn.SyncBatchNorm.convert_sync_batchnorm(model.head)
    model.to(device)
    train_set = own[0] if own is not None else SegmentationDataset(
        info, ids, labels, crop_size=args.deeplab_crop_size, scale_range=SCALE_RANGE, seed=args.seed, augment=True)
    if schedule is not None:
        train_set = ScheduledScale(train_set, ScaleSchedule.build(schedule, args.deeplab_iters))
    data = TrainData(train_set, args.deeplab_batch_size, args.seed, args.num_workers)

    def optimizer(net: nn.Module) -> PolyOptimizer:
        backbone_params, head_params = net.param_groups()
        lr = args.deeplab_learning_rate
        return PolyOptimizer([{"params": backbone_params, "lr": lr}, {"params": head_params, "lr": 10 * lr}],
                             lr=lr, weight_decay=args.deeplab_weight_decay, max_step=args.deeplab_iters, momentum=0.9)

    def losses(net: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return segmenter.losses(net, batch, device, args.amp)

    log.info("train_deeplab: %s-%s/%s OS%d on %d images (%s), %d iterations x batch %d", args.segmenter,
             args.deeplab_arch, args.deeplab_backbone, args.deeplab_output_stride, len(ids),
             own[2] if own is not None else labels or "ground truth",
             args.deeplab_iters, args.deeplab_batch_size)
    train(model, [Stage(args.deeplab_iters, optimizer)], data, out, fp, losses, ckpt_every=args.deeplab_ckpt_every)
    save_trained(model, out, fp)
