"""CAM classification network (spec 3.1): GAP + bias-free 1x1 conv on the last backbone level (or, in a
subclass, on another feature map: ``features``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from net.backbone import Backbone


class CAMNet(nn.Module):
    """Multi-label classifier whose class activation maps come from the same 1x1 conv.

    Because the classifier is linear and bias-free, ``forward(x)`` equals the spatial mean of the
    pre-ReLU class map ``classifier(x5)``: the CAM identity.
    """

    def __init__(self, backbone: Backbone, num_classes: int, frozen_levels: int = 3,
                 feature_channels: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        # IRNet freezes conv1..layer2 (levels 0-2): they receive no gradient.
        self.backbone.freeze_levels(frozen_levels)
        self.classifier = nn.Conv2d(feature_channels or backbone.channels[-1], num_classes, 1, bias=False)

    def features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> the map the classifier reads, ``(B, C', h, w)`` at ``backbone.strides[-1]``."""
        return self.backbone(x)[-1]

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` normalised RGB -> logits ``(B, num_classes)``."""
        return self.classifier(self.features(x).mean((2, 3), keepdim=True)).flatten(1)

    def cam(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``ReLU(classifier(features(x)))`` of shape ``(B, num_classes, h, w)``;
        unnormalised, no flip fusion (the caller sums the flipped pass)."""
        return F.relu(self.classifier(self.features(x)))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters, classifier parameters), for the two learning rates."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return backbone, list(self.classifier.parameters())
