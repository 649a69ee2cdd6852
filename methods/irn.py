"""IRNet's refiner (spec 6-8): confident seeds -> IRN (boundaries, displacements) -> random walk of the CAMs.

Its steps: ``cam_to_ir_label`` (seeds), ``eval_ir_label`` (their precision / recall), ``train_irn``,
``make_sem_seg_labels`` (semantic pseudo masks), ``eval_sem_seg``, ``make_ins_seg_labels`` (instance pseudo
labels), ``eval_ins_seg``. What the steps share lives here: the IRN builder and its losses, the trained
network's inference, and the random walk.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import dataset
from dataset.base import read_id_list
from methods.base import Refiner
from misc import dist
from misc.convert import load_weights
from misc.crf import ir_label_from_cam
from misc.imutils import hwc_to_chw, normalize
from misc.indexing import PathIndex, affinity_labels, random_walk
from misc.io import load_cam
from misc.pipeline import (
    autocast,
    dir_fingerprint,
    fingerprint,
    prepare_outputs,
    require_files,
    trained_weights,
    weights_fingerprint,
)
from misc.thresholds import thresholds
from misc.weights import resolve_weights
from net.factory import build_backbone
from net.irn import IRN, edge_and_displacement, irn_loss

TRAIN_RADIUS = 10  # PathIndex radius during training (spec 7.2); inference uses 5


class IRNRefiner(Refiner):
    name = "irn"
    steps = (
        ("cam_to_ir_label", "cam_to_ir_label"),
        ("eval_ir_label", "eval_ir_label"),
        ("train_irn", "train_irn"),
        ("make_sem_seg", "make_sem_seg_labels"),
        ("eval_sem_seg", "eval_sem_seg"),
        ("make_ins_seg", "make_ins_seg_labels"),
        ("eval_ins_seg", "eval_ins_seg"),
    )

    def seed_rule(self, args: argparse.Namespace) -> tuple[Callable[..., np.ndarray], dict[str, float]]:
        values = thresholds(args)
        return ir_label_from_cam, {"fg_thres": values["conf_fg_thres"], "bg_thres": values["conf_bg_thres"]}


def build_irn(args: argparse.Namespace) -> IRN:
    """IRN on a fresh ImageNet backbone (``args.backbone_weights``), on the CPU."""
    return IRN(build_backbone(args.backbone, resolve_weights(args.backbone_weights)))


def irn_weights(args: argparse.Namespace) -> str:
    """The IRN weights this round uses: ``--irn_weights`` (a path or registry name), else train_irn's output."""
    return trained_weights(args.irn_weights, args.irn_weights_name, "train_irn", "--irn_weights")


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


class IRNInference:
    """The trained IRN in eval mode: image id -> (uint8 image (H, W, 3), edge (H4, W4), displacement (2, H4, W4))."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.model = build_irn(args)
        load_weights(self.model, irn_weights(args), "irn")
        self.model.to(device).eval()
        self.info = dataset.from_args(args)
        self.device = device

    def __call__(self, image_id: str) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        img = self.info.read_photo(image_id)
        x = torch.from_numpy(hwc_to_chw(normalize(img)))[None].to(self.device)
        edge, disp = edge_and_displacement(self.model, x)
        return img, edge.float(), disp.float()


def propagate(cams: torch.Tensor, edge: torch.Tensor, size: tuple[int, int], args: argparse.Namespace) -> torch.Tensor:
    """Random-walk (n, H4, W4) maps over the (H4, W4) boundary map and upsample them to (n, H, W).

    Reference (``args.rw_normalize`` false): the walked maps divided by their max over all maps together
    (not per class), the scale the background threshold 0.25 was tuned on. The walk averages the maps
    weighted by ``1 - B``, so its peaks drop and this division inflates everything: harmless when CAMs are
    ~0 off the objects, but it lifts a CAM that spills onto the context above the threshold.
    ``rw_normalize``: the walked maps divided by the walked ``1 - B`` mass, i.e. the boundary-weighted
    mean of each map over the region the walk reaches. It stays in CAM units, so the CAM's own
    threshold applies to it.
    """
    maps = torch.cat([torch.ones_like(cams[:1]), cams]) if args.rw_normalize else cams
    walked = random_walk(maps, edge, beta=args.beta, exp_times=args.exp_times, radius=5)
    if args.rw_normalize:
        walked = walked[1:] / walked[:1].clamp_min(1e-5)
    h, w = size
    up = F.interpolate(walked[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, :h, :w]
    return up if args.rw_normalize else up / (up.max() + 1e-5)


def pseudo_label_inputs(
    args: argparse.Namespace, list_file: str, outputs: dict[str, dict[str, object]], suffix: str, desc: str
) -> Iterator[tuple[str, list[Path], np.ndarray, torch.Tensor, torch.Tensor, dict[str, np.ndarray]]]:
    """What a pseudo-label step needs per pending image of this rank's share of ``list_file``.

    ``outputs`` maps each output folder to its own settings (thresholds); every folder is stamped with
    those and with the CAMs, IRN weights and random-walk settings it derives from. An image is pending
    while any folder lacks its file. Yields (id, output folders in the order given, uint8 image (H, W, 3),
    edge (H4, W4), displacement (2, H4, W4), CAM file).
    """
    device = dist.init(args.device)
    ids = read_id_list(list_file)
    require_files(args.cam_out_dir, ids, ".npz", "make_cam")
    weights = irn_weights(args)
    walk = fingerprint(cams=dir_fingerprint(args.cam_out_dir, "make_cam"), irn=weights_fingerprint(weights),
                       beta=args.beta, exp_times=args.exp_times, rw_normalize=args.rw_normalize)
    # The network is loaded (and its weights checked) before any stale output is cleared.
    irn = IRNInference(args, device)
    dirs, todo = prepare_outputs(ids, outputs, walk, suffix)
    for image_id in tqdm(todo, desc=desc, disable=not dist.is_main(), mininterval=2):
        img, edge, displacement = irn(image_id)
        yield image_id, dirs, img, edge, displacement, load_cam(Path(args.cam_out_dir) / f"{image_id}.npz")
