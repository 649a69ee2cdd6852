"""DeepLab-v2 / v3+ (spec 11) as the segmenter."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from methods.base import Segmenter
from misc.labels import IGNORE
from net.deeplab import DeepLab, build_deeplab


class DeepLabSegmenter(Segmenter):
    """``--segmenter deeplab``: ``--deeplab_arch`` on ``--deeplab_backbone`` at ``--deeplab_output_stride``."""

    name = "deeplab"
    settings = ("deeplab_arch", "deeplab_backbone", "deeplab_output_stride")

    def build(self, args: argparse.Namespace, num_labels: int, backbone_weights: str | None) -> DeepLab:
        """DeepLab with ``backbone_weights`` (ImageNet) in its backbone; ``None``: random init."""
        return build_deeplab(args.deeplab_arch, args.deeplab_backbone, backbone_weights, args.deeplab_output_stride,
                             num_classes=num_labels)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy ignoring 255: the mean over labelled pixels, and 0 (not NaN) for a batch whose crops
        are all ignore."""
        valid = (target != IGNORE).sum().clamp(min=1)
        return F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum") / valid
