"""Progressive Patch Learning (PPL, Li et al., IEEE TMM 2022) as a CAM method: ``--cam_method ppl``.

The network is ``net.ppl.PPLNet``; what this module adds is the training schedule. The **progressive**
variant trains one model in one stage per patch level (``--ppl_levels``, low to high by default), each stage
with the CAM recipe and a poly learning rate that restarts (spec 3); the CAMs come from the last stage's
structure. The **explicit** variant trains every patch branch at once, in one stage (spec 4). The loss and
the CAMs are the plain CAM network's. Choices the paper leaves open are listed in docs/ppl.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from torch import nn

from methods.cam import PlainCAM, cam_optimizer
from misc.flags import str2bool
from misc.train import Stage
from misc.weights import resolve_weights
from net.factory import build_backbone
from net.ppl import VARIANTS, PPLNet

# Levels 0-2 frozen is IRNet's choice; PPL lets patch learning shape the lower blocks (spec 5).
IRN_FROZEN_LEVELS, PPL_FROZEN_LEVELS = 3, 1


class PPL(PlainCAM):
    """``--cam_method ppl``: ``PPLNet`` trained in stages (progressive) or with all branches (explicit)."""

    name = "ppl"
    settings = ("ppl_variant", "ppl_grid", "ppl_levels", "ppl_stage_epochs", "ppl_freeze_low_stages")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("PPL (--cam_method ppl, docs/ppl.md)")
        g.add_argument("--ppl_variant", choices=VARIANTS, default="progressive")
        g.add_argument("--ppl_grid", type=int, default=2, help="patches per side (s x s grid)")
        g.add_argument("--ppl_levels", type=int, nargs="+", default=[1, 2, 3],
                       help="backbone levels (0-3) after which the map is cut, in stage order; ResNet: "
                            "1 = after layer1, 2 = layer2, 3 = layer3")
        g.add_argument("--ppl_stage_epochs", type=int, nargs="+", default=None,
                       help="progressive: epochs of each stage (default --cam_num_epoches each)")
        g.add_argument("--ppl_freeze_low_stages", type=str2bool, default=False,
                       help="freeze levels 0-2 as IRNet does (default: only the stem)")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> str | None:
        if args.ppl_grid < 1:
            return f"--ppl_grid must be >= 1, got {args.ppl_grid}"
        if any(not 0 <= level <= 3 for level in args.ppl_levels) or len(set(args.ppl_levels)) < len(args.ppl_levels):
            return f"--ppl_levels must be distinct backbone levels in 0..3, got {args.ppl_levels}"
        if args.ppl_stage_epochs is not None:
            if args.ppl_variant == "explicit":
                return "--ppl_stage_epochs is for --ppl_variant progressive; the explicit variant trains " \
                       "--cam_num_epoches in one stage"
            if len(args.ppl_stage_epochs) != len(args.ppl_levels) or min(args.ppl_stage_epochs) < 1:
                return (f"--ppl_stage_epochs needs one epoch count >= 1 per --ppl_levels entry "
                        f"({len(args.ppl_levels)}), got {args.ppl_stage_epochs}")
        return None

    def build(self, args: argparse.Namespace, num_classes: int) -> PPLNet:
        return PPLNet(
            build_backbone(args.backbone, resolve_weights(args.backbone_weights)), num_classes,
            grid=args.ppl_grid, patch_levels=args.ppl_levels, variant=args.ppl_variant,
            frozen_levels=IRN_FROZEN_LEVELS if args.ppl_freeze_low_stages else PPL_FROZEN_LEVELS,
        )

    def stages(self, args: argparse.Namespace, steps_per_epoch: int,
               poly_length: Callable[[int], int]) -> list[Stage]:
        if args.ppl_variant == "explicit":
            return super().stages(args, steps_per_epoch, poly_length)
        epochs = args.ppl_stage_epochs or [args.cam_num_epoches] * len(args.ppl_levels)
        stages = []
        for level, n in zip(args.ppl_levels, epochs, strict=True):
            steps = steps_per_epoch * n
            stages.append(Stage(steps, cam_optimizer(args, poly_length(steps)), prepare=_patch_at(level)))
        return stages


def _patch_at(level: int) -> Callable[[nn.Module], None]:
    def prepare(model: nn.Module) -> None:
        model.set_patch_level(level)

    return prepare
