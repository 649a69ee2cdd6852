"""Train the inter-pixel relation network on the IR labels (spec 7), then estimate its mean shift (7.6).

The backbone is a fresh ImageNet one, entirely frozen (not the CAM weights, as the reference); only the
boundary and displacement heads train.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from misc import dist
from misc.errors import UserError
from misc.imutils import hwc_to_chw, normalize
from misc.indexing import PathIndex, affinity_labels, get_path_index
from misc.optim import PolyOptimizer
from misc.pipeline import (
    autocast,
    content_fingerprint,
    dir_fingerprint,
    fingerprint,
    require_files,
    train_loader,
    up_to_date,
)
from misc.train import save_trained, train_epochs
from misc.weights import load_weights, resolve_weights
from net.backbone import build_backbone
from net.irn import IRN, edge_and_displacement, estimate_mean_shift, irn_loss
from voc12.dataset import (
    ClassificationDataset,
    SegmentationDataset,
    VOCLayout,
    load_cls_labels,
    read_id_list,
    read_image,
)

log = logging.getLogger("wsss")

TRAIN_RADIUS = 10  # PathIndex radius during training (spec 7.2); inference uses 5
TRAINING_SETTINGS = ("irn_crop_size", "irn_batch_size", "irn_num_epoches", "irn_learning_rate", "irn_weight_decay",
                     "irn_momentum", "backbone", "backbone_weights", "seed")


def build_irn(args: argparse.Namespace, device: torch.device) -> IRN:
    return IRN(build_backbone(args.backbone, resolve_weights(args.backbone_weights))).to(device)


def irn_weights(args: argparse.Namespace) -> str:
    """The IRN weights this round uses: ``--irn_weights`` (a path or registry name), else train_irn's output."""
    if args.irn_weights:
        return args.irn_weights
    if not Path(args.irn_weights_name).is_file():
        raise UserError(f"IRN weights {args.irn_weights_name} are missing: run train_irn first "
                        "(--train_irn_pass true) or pass --irn_weights.")
    return args.irn_weights_name


def batch_losses(
    net: torch.nn.Module, batch: dict, path_index: PathIndex, device: torch.device, amp: bool
) -> dict[str, torch.Tensor]:
    """IRN losses of a batch: images (B, 3, S, S) and IR labels (B, S/4, S/4); ``total`` first."""
    img = batch["img"].to(device, non_blocking=True)
    # Pair labels are built on the host per image, then moved: (B, K, n_sources) each.
    labels = [affinity_labels(lab, path_index) for lab in batch["label"].numpy()]
    bg_pos, fg_pos, neg = (torch.stack(t).to(device) for t in zip(*labels, strict=True))
    with autocast(device, amp):
        edge, disp = net(img)
    terms = irn_loss(edge.float(), disp.float(), bg_pos, fg_pos, neg, path_index)
    return {"total": terms.pop("total"), **terms}


def run(args: argparse.Namespace) -> None:
    device = dist.init(args.device)
    out = Path(args.irn_weights_name)
    ids = read_id_list(args.train_list)
    require_files(args.ir_label_out_dir, ids, ".png", "cam_to_ir_label")
    settings = {k: getattr(args, k) for k in TRAINING_SETTINGS}
    fp = fingerprint(settings=settings, labels=dir_fingerprint(args.ir_label_out_dir, "cam_to_ir_label"),
                     train=content_fingerprint(args.train_list), mean_shift=content_fingerprint(args.infer_list))
    if up_to_date(out, fp):
        log.info("train_irn: %s is up to date with its inputs; skipping (delete it to retrain)", out)
        return
    dataset = SegmentationDataset(
        args.voc12_root, ids, args.ir_label_out_dir, crop_size=args.irn_crop_size,
        scale_range=(0.5, 1.5), label_scale=0.25, seed=args.seed,
    )
    loader = train_loader(dataset, args.irn_batch_size, args)
    if len(loader) == 0:
        raise ValueError(f"{args.train_list} has fewer images than one batch ({args.irn_batch_size})")
    max_step = len(loader) * args.irn_num_epoches
    grid = (args.irn_crop_size + 3) // 4
    path_index = get_path_index(TRAIN_RADIUS, (grid, grid))

    model = build_irn(args, device)
    optimizer = PolyOptimizer(model.param_groups(args.irn_learning_rate), lr=args.irn_learning_rate,
                              weight_decay=args.irn_weight_decay, max_step=max_step, momentum=args.irn_momentum)
    log.info("train_irn: %d images, %d steps/epoch x %d epochs", len(dataset), len(loader), args.irn_num_epoches)

    def losses(net: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return batch_losses(net, batch, path_index, device, args.amp)

    train_epochs(model, optimizer, loader, args.irn_num_epoches, out, fp, losses)
    shift = estimate_mean_shift(model, _mean_shift_loader(args))
    log.info("train_irn: mean shift %s", shift.tolist())
    save_trained(model, out, fp)


def _mean_shift_loader(args: argparse.Namespace) -> DataLoader:
    """Top-left crops of this rank's share of the inference list (spec 7.6)."""
    ids = dist.shard(read_id_list(args.infer_list))
    dataset = ClassificationDataset(args.voc12_root, ids, load_cls_labels(args.cls_labels),
                                    crop_size=args.irn_crop_size, augment=False)
    return DataLoader(dataset, batch_size=args.irn_batch_size, num_workers=args.num_workers)


class IRNInference:
    """The trained IRN in eval mode: image id -> (uint8 image (H, W, 3), edge (H4, W4), displacement (2, H4, W4))."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.model = build_irn(args, device)
        load_weights(self.model, irn_weights(args), "irn")
        self.model.eval()
        self.layout = VOCLayout(args.voc12_root)
        self.device = device

    def __call__(self, image_id: str) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        img = read_image(self.layout.image(image_id))
        x = torch.from_numpy(hwc_to_chw(normalize(img)))[None].to(self.device)
        edge, disp = edge_and_displacement(self.model, x)
        return img, edge.float(), disp.float()
