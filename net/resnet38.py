"""ResNet-38 ("Model A1" of Wu, Shen and van den Hengel, arXiv 1611.10080) at output stride 8, in the layout
and with the module names of PSA's ``network/resnet38d.py`` (spec seam_affinitynet.md 1.2-1.5).

Module names are the state-dict prefixes of PSA, SEAM and CDA checkpoints (``conv1a``, ``b2`` ... ``b7``,
``bn7``; inside a block ``bn_branch2a``, ``conv_branch2a``, ``bn_branch2b1``, ``conv_branch2b1``,
``conv_branch1`` and, in the bottlenecks, ``bn_branch2b2``, ``conv_branch2b2``), so their backbone keys
load unchanged; the ImageNet MXNet file is read and renamed by ``misc.mxnet_params``.

Both block types are pre-activation residual blocks: a block starts with BN + ReLU of its input, so the
output of a block is a raw residual sum. Levels (``strides = (2, 4, 8, 8, 8)``):

=====  ===========================  ========  ======  ==================================
level  modules                      channels  stride  ``tap(level, x)``
=====  ===========================  ========  ======  ==================================
0      conv1a, b2, b2_1, b2_2       128       2       ReLU(b3.bn_branch2a(x))
1      b3, b3_1, b3_2               256       4       ReLU(b4.bn_branch2a(x)): SEAM's conv3
2      b4, b4_1 ... b4_5            512       8       ReLU(b5.bn_branch2a(x)): PSA's conv4
3      b5, b5_1, b5_2 (dilation 2)  1024      8       ReLU(b6.bn_branch2a(x)): PSA's conv5
4      b6, b7 (dilation 4), bn7,    4096      8       x (already PSA's conv6)
       ReLU
=====  ===========================  ========  ======  ==================================

Levels 0-3 return the raw residual sums (what the next level consumes); heads read :meth:`ResNet38.tap`,
the activation PSA computes inside the next block. Every BatchNorm is frozen (spec 1.5): fixed statistics
*and* ``requires_grad = False`` on its affine parameters, whatever ``freeze_levels`` is called with.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from net.backbone import CLASSIFIER_PREFIXES, Backbone, FixedBatchNorm2d

# Heads of the full PSA / SEAM / CDA networks (CAM classifier ``fc8``, affinity / PCM convs ``f8_*``, ``f9``):
# a full-network checkpoint loads into the backbone with these skipped.
RESNET38_HEAD_PREFIXES: tuple[str, ...] = ("fc8.", "f8_", "f9.")


class ResBlock(nn.Module):
    """Pre-activation block of two 3x3 convs (PSA's ``ResBlock``).

    ``p = ReLU(bn_branch2a(x))``; ``branch = conv_branch2b1(ReLU(bn_branch2b1(conv_branch2a(p))))``;
    shortcut ``x`` when the shape is kept, else ``conv_branch1(p)`` (1x1 on the *pre-activated* input).
    ``conv_branch2a`` carries the stride and ``first_dilation``, ``conv_branch2b1`` the ``dilation``.
    """

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1, first_dilation: int | None = None,
                 dilation: int = 1) -> None:
        super().__init__()
        d1 = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = FixedBatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, mid_ch, 3, stride, padding=d1, dilation=d1, bias=False)
        self.bn_branch2b1 = FixedBatchNorm2d(mid_ch)
        self.conv_branch2b1 = nn.Conv2d(mid_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        # Absent (not an identity module) when the shape is kept, so the state dict has PSA's keys only.
        self.conv_branch1 = None
        if in_ch != out_ch or stride != 1:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_ch, H, W) -> (B, out_ch, ceil(H / stride), ceil(W / stride))``."""
        p = F.relu(self.bn_branch2a(x))
        shortcut = x if self.conv_branch1 is None else self.conv_branch1(p)
        branch = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(p))))
        return shortcut + branch


class ResBlockBot(nn.Module):
    """Pre-activation bottleneck 1x1 (out/4) - 3x3 (out/2, ``dilation``) - 1x1 (out), PSA's ``ResBlock_bot``.

    The shortcut is always the projection ``conv_branch1(p)``. ``Dropout2d(dropout)`` is applied twice, before
    ``conv_branch2b1`` and before ``conv_branch2b2``, as PSA does (MXNet A1 drops once: spec 6 #20, reproduced).
    """

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn_branch2a = FixedBatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, out_ch // 4, 1, bias=False)
        self.bn_branch2b1 = FixedBatchNorm2d(out_ch // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_ch // 4, out_ch // 2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = FixedBatchNorm2d(out_ch // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_ch // 2, out_ch, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_ch, H, W) -> (B, out_ch, H, W)``."""
        p = F.relu(self.bn_branch2a(x))
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(p)))))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))
        return self.conv_branch1(p) + y


class ResNet38(Backbone):
    """ResNet-38 A1, output stride 8 (PSA/SEAM's ``resnet38d``); see the module docstring for the levels.

    105,070,912 parameters, 191 state-dict tensors besides the ``num_batches_tracked`` counters. PSA's
    freezing of conv1a / b2* is ``freeze_levels(1)``; BN affine parameters never train.
    """

    name = "resnet38"
    head_prefixes = CLASSIFIER_PREFIXES + RESNET38_HEAD_PREFIXES

    def __init__(self) -> None:
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)

        self.b2 = ResBlock(64, 128, 128, stride=2)
        self.b2_1 = ResBlock(128, 128, 128)
        self.b2_2 = ResBlock(128, 128, 128)

        self.b3 = ResBlock(128, 256, 256, stride=2)
        self.b3_1 = ResBlock(256, 256, 256)
        self.b3_2 = ResBlock(256, 256, 256)

        self.b4 = ResBlock(256, 512, 512, stride=2)
        self.b4_1 = ResBlock(512, 512, 512)
        self.b4_2 = ResBlock(512, 512, 512)
        self.b4_3 = ResBlock(512, 512, 512)
        self.b4_4 = ResBlock(512, 512, 512)
        self.b4_5 = ResBlock(512, 512, 512)

        # From here on strides become dilations (output stride 8); b5's first conv still sees dilation 1.
        self.b5 = ResBlock(512, 512, 1024, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = ResBlock(1024, 512, 1024, dilation=2)

        self.b6 = ResBlockBot(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = ResBlockBot(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = FixedBatchNorm2d(4096)
        self.relu7 = nn.ReLU(inplace=True)

        self.channels = (128, 256, 512, 1024, 4096)
        self.strides = (2, 4, 8, 8, 8)
        # The first block of the next level owns the BN whose ReLU output is the tap of a level (spec 1.4).
        self._tap_blocks = (self.b3, self.b4, self.b5, self.b6)

        # Same conv init as net.resnet, so random-init runs (tests, demo) start from sane activations.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self._freeze_batchnorm()

    def level_modules(self) -> list[list[nn.Module]]:
        return [[self.conv1a, self.b2, self.b2_1, self.b2_2],
                [self.b3, self.b3_1, self.b3_2],
                [self.b4, self.b4_1, self.b4_2, self.b4_3, self.b4_4, self.b4_5],
                [self.b5, self.b5_1, self.b5_2],
                [self.b6, self.b7, self.bn7, self.relu7]]

    def tap(self, level: int, x: Tensor) -> Tensor:
        """Level ``level``'s map ``x (B, channels[level], h, w)`` -> the feature heads read, same shape.

        Levels 0-3: ``ReLU(bn_branch2a(x))`` of the next level's first block (tap 1 = SEAM's conv3, 2 = PSA's
        conv4, 3 = conv5), exactly what that block computes first; level 4: ``x`` (conv6 = ReLU(bn7(.))).
        """
        if not 0 <= level <= 4:
            raise ValueError(f"tap expects a level in 0..4, got {level}")
        if level == 4:
            return x
        return F.relu(self._tap_blocks[level].bn_branch2a(x))

    def freeze_levels(self, n: int) -> None:
        """As ``Backbone.freeze_levels``, except that BN weight/bias stay frozen in every level (spec 1.5)."""
        super().freeze_levels(n)
        self._freeze_batchnorm()

    def _freeze_batchnorm(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                for p in m.parameters():
                    p.requires_grad_(False)
