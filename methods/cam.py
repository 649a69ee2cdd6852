"""IRNet's CAM network (spec 3) as a CAM method: GAP classifier, multilabel soft margin, one poly stage."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import CAMMethod
from misc.optim import PolyOptimizer
from misc.train import Stage
from misc.weights import resolve_weights
from net.cam import CAMNet
from net.factory import build_backbone

# Levels the CAM network freezes where its reference differs from IRNet's (levels 0-2): PSA trains ResNet-38
# from b3 up (seam_affinitynet spec 1.5).
FROZEN_LEVELS = {"resnet38": 1}


def cam_optimizer(args: argparse.Namespace, max_step: int) -> Callable[[nn.Module], PolyOptimizer]:
    """The CAM recipe's optimiser for a ``CAMNet``: poly over ``max_step`` steps, backbone at ``--cam_learning_rate``
    and classifier at 10x (spec 3.3)."""

    def make(model: nn.Module) -> PolyOptimizer:
        backbone_params, head_params = model.param_groups()
        lr = args.cam_learning_rate
        return PolyOptimizer(
            [{"params": backbone_params, "lr": lr}, {"params": head_params, "lr": 10 * lr}],
            lr=lr, weight_decay=args.cam_weight_decay, max_step=max_step, momentum=args.cam_momentum,
        )

    return make


class PlainCAM(CAMMethod):
    """``--cam_method cam``: ``net.cam.CAMNet`` (GAP + bias-free 1x1 conv), backbone at 1x and classifier at
    10x the learning rate (spec 3.3)."""

    name = "cam"

    def build(self, args: argparse.Namespace, num_classes: int) -> CAMNet:
        return CAMNet(build_backbone(args.backbone, resolve_weights(args.backbone_weights)), num_classes,
                      frozen_levels=FROZEN_LEVELS.get(args.backbone, 3))

    def stages(self, args: argparse.Namespace, steps_per_epoch: int,
               poly_length: Callable[[int], int]) -> list[Stage]:
        steps = steps_per_epoch * args.cam_num_epoches
        return [Stage(steps, cam_optimizer(args, poly_length(steps)))]

    def losses(self, net: nn.Module, imgs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.multilabel_soft_margin_loss(net(imgs).float(), labels)}

    def cams(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.cam(x)
