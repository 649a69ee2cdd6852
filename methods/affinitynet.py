"""AffinityNet (PSA, Ahn & Kwak CVPR 2018) as a refiner: ``--refiner affinitynet`` (seam_affinitynet spec 3).

Its steps: ``cam_to_ir_label`` with PSA's seeds (two CRFs with a ``(1 - max CAM)^alpha`` background),
``eval_ir_label``, ``train_affinity`` (``net.affinitynet``), ``make_sem_seg_affinity`` (the random walk of the
CAMs with PSA's background under the learnt affinities), ``eval_sem_seg``. What the steps share lives here:
the flags, the alphas, the network's builder and its trained weights.

Deviations from the released code, each for a stated reason: the seeds are fused at full resolution and
stored as one label PNG (not two float probability volumes, ~40 GB on VOC; spec 6 #21); every pixel walks
over its full neighbourhood (the reference drops some pairs of the 4-pixel border: spec 6 #13); the
momentum bug of spec 2.1 is reproduced through ``--aff_momentum`` like IRN's.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import Refiner
from misc.crf import aff_label_from_cam
from misc.errors import UserError
from misc.flags import out_of_bounds
from misc.indexing import path_offsets, walk_affinity
from misc.pipeline import trained_weights
from misc.thresholds import calibration_path, carried
from misc.weights import resolve_weights
from net.affinitynet import AffinityNet, alpha_threshold, feature_affinity, threshold_alpha
from net.factory import build_backbone

# PSA's published alphas (README: "4/16/32"): foreground seeds, random walk, background seeds.
PSA_ALPHAS = {"aff_low_alpha": 4.0, "aff_rw_alpha": 16.0, "aff_high_alpha": 32.0}
RADIUS = 5  # pairs within 5 grid cells, in training and in the walk (spec 3.5, 3.9)


class AffinityNetRefiner(Refiner):
    """``--refiner affinitynet``: PSA's seeds, AffinityNet, and its random walk (spec 3)."""

    name = "affinitynet"
    steps = (
        ("cam_to_ir_label", "cam_to_ir_label"),
        ("eval_ir_label", "eval_ir_label"),
        ("train_affinity", "train_affinity"),
        ("make_sem_seg", "make_sem_seg_affinity"),
        ("eval_sem_seg", "eval_sem_seg"),
    )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("AffinityNet (--refiner affinitynet, seam_affinitynet spec 3)")
        for flag, value in PSA_ALPHAS.items():
            role = {"aff_low_alpha": "foreground seeds", "aff_rw_alpha": "the walk's background",
                    "aff_high_alpha": "background seeds"}[flag]
            g.add_argument(f"--{flag}", type=float, default=None,
                           help=f"background power for {role}; default PSA's {value:g}, or carried over from "
                                "the CAMs' best threshold with --calibrate_thresholds")
        g.add_argument("--affinity_weights", default=None, help="use these AffinityNet weights instead of training")
        g.add_argument("--aff_crop_size", type=int, default=None, help="a multiple of 8 (PSA: 448)")
        g.add_argument("--aff_batch_size", type=int, default=None)
        g.add_argument("--aff_num_epoches", type=int, default=None)
        g.add_argument("--aff_learning_rate", type=float, default=None,
                       help="backbone; new layers 10x (PSA's ResNet-38: 0.01, SEAM's default)")
        g.add_argument("--aff_weight_decay", type=float, default=5e-4)
        g.add_argument("--aff_momentum", type=float, default=None, help="as --cam_momentum")
        g.add_argument("--aff_beta", type=float, default=8, help="affinity power in the walk")
        g.add_argument("--aff_logt", type=int, default=None, help="the walk takes 2^aff_logt steps (PSA 8, SEAM 6)")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> str | None:
        problem = (out_of_bounds(args, PSA_ALPHAS, 0, strict=True)
                   or out_of_bounds(args, ("aff_crop_size", "aff_batch_size", "aff_num_epoches"), 1))
        if problem is not None:
            return problem
        if args.aff_crop_size % 8 or args.aff_crop_size < 8 * (2 * RADIUS):
            return (f"--aff_crop_size must be a multiple of 8 of at least {8 * 2 * RADIUS} (pairs reach {RADIUS} "
                    f"cells of the stride-8 grid), got {args.aff_crop_size}")
        if args.aff_learning_rate <= 0 or args.aff_logt < 0:
            return "--aff_learning_rate must be > 0 and --aff_logt >= 0"
        return None

    def seed_rule(self, args: argparse.Namespace) -> tuple[Any, dict[str, float]]:
        a = alphas(args)
        return aff_label_from_cam, {"low_alpha": a["aff_low_alpha"], "high_alpha": a["aff_high_alpha"]}


def alphas(args: argparse.Namespace) -> dict[str, float]:
    """This round's three alphas: those given, else PSA's; with ``--calibrate_thresholds`` the unset ones are
    carried over from the round's best CAM threshold like IRN's thresholds (``misc.thresholds``), through
    the score each alpha makes the background win below (``net.affinitynet.alpha_threshold``)."""
    given = {flag: getattr(args, flag) for flag in PSA_ALPHAS}
    if not args.calibrate_thresholds:
        return {flag: value if value is not None else PSA_ALPHAS[flag] for flag, value in given.items()}
    path = calibration_path(args)
    if not path.is_file():
        raise UserError(f"{path} is missing: --calibrate_thresholds needs eval_cam's sweep; run eval_cam first "
                        "(--eval_cam_pass true), or give the alphas with --calibrate_thresholds false")
    best = json.loads(path.read_text())["best_cam_threshold"]
    return {flag: value if value is not None else
            round(threshold_alpha(carried(alpha_threshold(PSA_ALPHAS[flag]), best)), 3)
            for flag, value in given.items()}


def build_affinitynet(args: argparse.Namespace) -> AffinityNet:
    """AffinityNet on a fresh ImageNet backbone (``args.backbone_weights``), on the CPU."""
    return AffinityNet(build_backbone(args.backbone, resolve_weights(args.backbone_weights)))


def affinity_weights(args: argparse.Namespace) -> str:
    """The weights this round walks with: ``--affinity_weights``, else train_affinity's output."""
    return trained_weights(args.affinity_weights, args.affinity_weights_name, "train_affinity", "--affinity_weights")


@torch.no_grad()
def walk_cams(model: AffinityNet, img: torch.Tensor, high_res: torch.Tensor, rw_alpha: float, beta: float,
              logt: int) -> torch.Tensor:
    """PSA's random walk (spec 3.9) of one image's CAMs; returns walked scores ``(1 + k, H, W)``, background
    first, in CAM units (each pixel's walked score is an affinity-weighted mean of the grid's scores).

    ``img (1, 3, H, W)`` normalised, ``high_res (k, H, W)`` per-class max-normalised CAMs. The image is
    zero-padded to a multiple of the network's stride; the scores (background ``(1 - max)^rw_alpha``) are
    average-pooled onto its grid, walked ``2^logt`` steps under the affinities to the power ``beta``, and
    upsampled back.
    """
    h, w = high_res.shape[-2:]
    s = model.stride
    pad = (0, -w % s, 0, -h % s)
    feats = model(F.pad(img, pad))[0]
    offsets = torch.from_numpy(path_offsets(RADIUS))
    aff = feature_affinity(feats[None], offsets)[0].pow(beta)
    scores = torch.cat([(1 - high_res.amax(0, keepdim=True)) ** rw_alpha, high_res]) if len(high_res) else \
        torch.ones(1, h, w, device=img.device)
    grid = F.avg_pool2d(F.pad(scores[None], pad), s)[0]
    walked = walk_affinity(grid, aff, offsets, 2**logt)
    up = F.interpolate(walked[None], scale_factor=s, mode="bilinear", align_corners=False)[0]
    return up[:, :h, :w]


def label_from_walk(walked: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Walked scores ``(1 + k, H, W)`` (background first) of classes ``keys`` -> uint8 labels ``(H, W)``."""
    lookup = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1]).astype(np.uint8)
    return lookup[walked.argmax(0)]
