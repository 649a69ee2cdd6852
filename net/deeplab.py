"""DeepLab-v2 and DeepLab-v3+ segmenters on the shared backbone interface (spec 11).

Both take a dilated backbone from ``net.backbone.build_backbone(name, weights, dilate=True,
output_stride=...)`` and return per-class logits, by default upsampled (bilinear) to the input size.

BatchNorm choice: the backbone keeps ``FixedBatchNorm2d`` (ImageNet running statistics, learnable
affine), as DeepLab-v2 did: a per-device batch of a few 321x321 crops gives statistics too noisy to
re-estimate. The v3+ head is trained from scratch, so its BatchNorm layers are ordinary
``nn.BatchNorm2d`` (converted to ``nn.SyncBatchNorm`` by the training step under DDP on CUDA); they all
see spatial maps, so even one image per batch gives usable statistics.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from misc.errors import UserError
from net.backbone import Backbone
from net.factory import build_backbone

ARCHS: tuple[str, ...] = ("v2", "v3+")
V2_RATES: tuple[int, ...] = (6, 12, 18, 24)
# v3+ atrous rates at output stride 16; doubled at output stride 8 so the field of view stays the same.
V3P_RATES_OS16: tuple[int, ...] = (6, 12, 18)


class ASPPv2(nn.Module):
    """DeepLab-v2 ASPP: four 3x3 convolutions with dilations ``rates``, each straight to class logits,
    summed. ``(B, in_channels, h, w) -> (B, num_classes, h, w)``."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = V2_RATES) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates
        )
        # DeepLab-v2's initialisation of the classifier: N(0, 0.01) weights, zero bias.
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return sum(branch(x) for branch in self.branches)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPPv3(nn.Module):
    """DeepLab-v3 ASPP: 1x1 branch, three 3x3 atrous branches, image pooling; concatenated, projected by a
    1x1 conv, dropout. ``(B, in_channels, h, w) -> (B, out_channels, h, w)``."""

    def __init__(self, in_channels: int, rates: tuple[int, ...], out_channels: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, 1)]
            + [_conv_bn_relu(in_channels, out_channels, 3, dilation=r) for r in rates]
        )
        # No BatchNorm on the pooled branch (unlike the v3 paper): its statistics would come from one
        # scalar per image and channel, i.e. from only B values at DeepLab's small per-device batches, and
        # the resulting train/eval mismatch made a v3+ trained at the demo learning rate predict only
        # background in eval mode on a synthetic set (with a biased conv instead: 92 mIoU).
        self.pool = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True))
        self.project = _conv_bn_relu(out_channels * (len(rates) + 2), out_channels, 1)
        # 0.1 as in the reference TensorFlow DeepLab (keep probability 0.9 after the projection).
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        # The pooled branch is a constant map: broadcasting equals bilinear upsampling of a 1x1 map.
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        outs.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
        return self.dropout(self.project(torch.cat(outs, dim=1)))


class V3PlusHead(nn.Module):
    """ASPP on the last level plus the v3+ decoder on a stride-4 level.

    ``forward(high (B, C_high, h, w), low (B, C_low, H/4, W/4)) -> (B, num_classes, H/4, W/4)``.
    """

    def __init__(self, high_channels: int, low_channels: int, num_classes: int,
                 rates: tuple[int, ...], dropout: float = 0.1) -> None:
        super().__init__()
        self.aspp = ASPPv3(high_channels, rates, dropout=dropout)
        self.reduce = _conv_bn_relu(low_channels, 48, 1)
        self.fuse = nn.Sequential(_conv_bn_relu(256 + 48, 256, 3), _conv_bn_relu(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # The classifier feeds a softmax, not a ReLU: Kaiming's fan-out std (~0.3 for 21 classes) gives
        # initial logits of std ~3 and a first loss near 7, whose gradients can wreck the pretrained
        # backbone in the first steps (one demo seed fell to 22 val mIoU). N(0, 0.01) as in DeepLab-v2.
        nn.init.normal_(self.classifier.weight, std=0.01)

    def features(self, high: Tensor, low: Tensor) -> Tensor:
        """The decoder's fused features ``(B, 256, H/4, W/4)``, the classifier's input (AGMM's prototypes
        and Gaussian mixtures live in this space)."""
        low = self.reduce(low)
        high = F.interpolate(self.aspp(high), size=low.shape[2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([high, low], dim=1))

    def forward(self, high: Tensor, low: Tensor) -> Tensor:
        return self.classifier(self.features(high, low))


class DeepLab(nn.Module):
    """Backbone + DeepLab head. ``forward(x (B, 3, H, W)) -> logits (B, num_classes, H, W)``."""

    def __init__(self, backbone: Backbone, arch: str, num_classes: int, rates: tuple[int, ...] | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"unknown DeepLab arch {arch!r}; choose one of {', '.join(ARCHS)}")
        self.arch = arch
        self.backbone = backbone
        self.output_stride = backbone.strides[-1]
        if arch == "v2":
            self.head: nn.Module = ASPPv2(backbone.channels[-1], num_classes)
        else:
            if 4 not in backbone.strides:
                raise ValueError(f"DeepLab-v3+ needs a stride-4 level; backbone strides {backbone.strides}")
            # The deepest stride-4 level carries the richest low-level features (ResNet: layer1; ResNet-38:
            # level 1, b3_2; its level 0 is at stride 2).
            self.low_level = max(i for i, s in enumerate(backbone.strides) if s == 4)
            if rates is None:
                rates = tuple(r * 16 // self.output_stride for r in V3P_RATES_OS16)
            self.head = V3PlusHead(backbone.channels[-1], backbone.channels[self.low_level], num_classes,
                                   rates, dropout)

    def forward(self, x: Tensor, upsample: bool = True, features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``(B, 3, H, W)`` normalised RGB -> logits ``(B, num_classes, H, W)``; with ``upsample=False``
        at the head's resolution (``H/output_stride`` for v2, ``H/4`` for v3+). ``features=True`` (v3+ only)
        returns ``(decoder features (B, 256, H/4, W/4), logits)``: a loss that reads the features (AGMM) goes
        through ``forward``, so a DDP wrapper still sees the call."""
        feats = self.backbone(x)
        # Heads read the levels through ``tap``: a pre-activation backbone (ResNet-38) returns raw residual
        # sums, and its activated map is what the decoder should see (identity on the other backbones).
        high = self.backbone.tap(4, feats[4])
        if self.arch == "v2":
            if features:
                raise ValueError("DeepLab-v2 has no decoder features: use v3+")
            logits = self.head(high)
            feat = None
        elif features:
            feat = self.head.features(high, self.backbone.tap(self.low_level, feats[self.low_level]))
            logits = self.head.classifier(feat)
        else:  # through the head's own forward, so hooks on the head see its logits
            logits = self.head(high, self.backbone.tap(self.low_level, feats[self.low_level]))
            feat = None
        if upsample:
            logits = F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)
        return (feat, logits) if features else logits

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters, head parameters): trained at 1x and 10x learning rate."""
        return (
            [p for p in self.backbone.parameters() if p.requires_grad],
            [p for p in self.head.parameters() if p.requires_grad],
        )


def build_deeplab(arch: str, backbone: str, weights: str | os.PathLike | None, output_stride: int = 16,
                  *, num_classes: int, rates: tuple[int, ...] | None = None, dropout: float = 0.1) -> DeepLab:
    """DeepLab ``arch`` (``'v2'`` or ``'v3+'``) on a dilated ``backbone`` at ``output_stride`` 16 or 8.

    ``weights`` are the backbone's (ImageNet) weights, passed to ``build_backbone``; the head is
    randomly initialised. v3+ only: ``rates`` are the ASPP's atrous rates as given (default: 6, 12, 18 at
    output stride 16, doubled at 8), ``dropout`` the rate after its projection.
    """
    net = build_backbone(backbone, weights, dilate=True, output_stride=output_stride)
    return DeepLab(net, arch, num_classes, rates, dropout)
