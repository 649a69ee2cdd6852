"""SEAM (Wang et al., CVPR 2020) as a CAM method: ``--cam_method seam`` (seam_affinitynet spec 4).

The network (``net.seam.SEAMNet``: a background + classes classifier and the pixel correlation module) and
the siamese losses live in ``net.seam``; this module adds the flags and plugs them into the generic steps.
Training is the plain CAM recipe's one poly stage (``--cam_learning_rate``, new layers at 10x, spec 4.4 for a
ResNet-38 run: ``--cam_batch_size 8 --cam_num_epoches 8 --cam_crop_size 448 --cam_resize_long 448 768
--cam_learning_rate 0.01 --cam_weight_decay 5e-4 --cam_scales 0.5 1.0 1.5 2.0``); the backbone is frozen as
the plain CAM network freezes it (ResNet-38: conv1a / b2*, as SEAM does).

CDA: ``train_cam`` hands ``losses`` one batch of ``cam_batch_size / 2`` originals followed by their composites,
and every SEAM term is a batch mean, so each composite goes through both siamese branches and every loss is
averaged over originals and composites (spec 5; the ECR's top-k is per sample, so its count is unchanged).

The CAMs are the PCM-refined map's foreground channels in eval mode (spec 4.5). Deviations, each for a
stated reason:

- Normalisation: as SEAM's inference (spec 4.5), ``make_cam`` subtracts each class's minimum before dividing
  by its maximum (``subtract_min``), clamped at 0 (spec 6 #17). It matters: every PCM pixel averages all
  similar pixels, so the refined map's minimum is far from 0 (on the tiny demo test run ~0.58 of its
  maximum, against ~0.0005 for the plain CAM); divided by the max alone, the best CAM mIoU of that run was
  36.9 at threshold 0.75, against 39.2 at 0.40 with the minimum subtracted (CDA round: 34.6 at 0.65 vs 35.9
  at 0.40). Absent classes are never written (the reference's -1 planes do not arise).
- ``make_cam`` resizes each scale to the image's size through the 16-multiple padding of IRNet's alignment,
  not straight to ``H x W``: a sub-pixel shift, the same for every CAM method.
- ``max_onehot`` is out of place (spec 6 #16); PCM input unmasked and fc8's background row untrained are
  reproduced (spec 6 #15).
- ``forward(x)`` of the network gives the classification logits (the CAM-method contract that
  ``train_cam``'s validation relies on); SEAM's ``(cam, cam_rv)`` are ``forward(x, maps=True)``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from methods.cam import FROZEN_LEVELS, PlainCAM
from misc.weights import resolve_weights
from net.factory import build_backbone
from net.seam import SEAMNet, seam_losses

SEAM_SCALE, SEAM_OHEM = 0.3, 0.2  # the released code's transform scale and ECR top-k ratio (spec 4.2-4.3)


class SEAM(PlainCAM):
    """``--cam_method seam``: ``SEAMNet`` trained with SEAM's siamese losses; CAMs from the PCM."""

    name = "seam"
    settings = ("seam_scale", "seam_ohem")
    subtract_min = True

    def __init__(self, scale: float = SEAM_SCALE, ohem: float = SEAM_OHEM) -> None:
        # The loss settings; ``build`` takes them from the flags (the steps call it before ``losses``).
        self.scale = scale
        self.ohem = ohem

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("SEAM (--cam_method seam, seam_affinitynet spec 4)")
        g.add_argument("--seam_scale", type=float, default=SEAM_SCALE,
                       help="branch 2 sees the crop downscaled by this factor, the transform of the "
                            "equivariance losses (SEAM: 0.3, 448 -> 134)")
        g.add_argument("--seam_ohem", type=float, default=SEAM_OHEM,
                       help="the ECR loss averages this fraction of each sample's largest errors (SEAM: 0.2)")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> str | None:
        if not 0 < args.seam_scale < 1:
            return f"--seam_scale must lie in (0, 1) (a downscale), got {args.seam_scale}"
        # The min-pool term keeps a quarter of branch 2's pixels: at least one needs a 2 x 2 crop.
        if args.cam_crop_size is not None and int(args.cam_crop_size * args.seam_scale) < 2:
            return (f"--seam_scale {args.seam_scale} shrinks the {args.cam_crop_size}-pixel crop (--cam_crop_size) "
                    "below 2 pixels: use a larger scale or crop")
        if not 0 < args.seam_ohem <= 1:
            return f"--seam_ohem must lie in (0, 1], got {args.seam_ohem}"
        return None

    def build(self, args: argparse.Namespace, num_classes: int) -> SEAMNet:
        self.scale, self.ohem = args.seam_scale, args.seam_ohem
        return SEAMNet(build_backbone(args.backbone, resolve_weights(args.backbone_weights)), num_classes,
                       frozen_levels=FROZEN_LEVELS.get(args.backbone, 3))

    def losses(self, net: nn.Module, imgs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """SEAM's total loss first, then its terms (``net.seam.seam_losses``); ``net`` may be DDP-wrapped
        (both branches go through its ``forward``)."""
        return seam_losses(net, imgs, labels, scale=self.scale, ohem_ratio=self.ohem)

    def cams(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> the PCM-refined foreground maps ``(B, C, h, w)``, non-negative (spec 4.5)."""
        _, cam_rv = model(x, maps=True)
        return F.relu(cam_rv[:, 1:])
