"""ResNet-50/101 "v1.5" with torchvision parameter names, as IRNet modifies it (spec 2).

Levels: stem incl. max-pool (64 ch, /4), layer1 (256, /4), layer2 (512, /8), layer3 (1024, /16),
layer4 (2048, /16). IRNet keeps layer4 at stride 1 *without* dilation; the DeepLab variant
(``dilate=True``) dilates every block of the stages whose stride was removed (DeepLab-v2 convention).
No avgpool/fc: the classifier weights of a torchvision checkpoint are dropped when loading.
"""

from __future__ import annotations

from torch import Tensor, nn

from net.backbone import Backbone, FixedBatchNorm2d

_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: "v1.5"), 1x1 expand (x4), plus a projection shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = FixedBatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = FixedBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = FixedBatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                            FixedBatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_ch, H, W) -> (B, 4 * width, H / stride, W / stride)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _stage(in_ch: int, width: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    layers = [Bottleneck(in_ch, width, stride, dilation)]
    layers += [Bottleneck(width * Bottleneck.expansion, width, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet(Backbone):
    """ResNet-``depth`` (50 or 101) backbone; state-dict keys match torchvision's ``resnet50/101``.

    ``dilate=False``: IRNet strides (layer4 stride 1, no dilation), ``strides = (4, 4, 8, 16, 16)``.
    ``dilate=True``: output stride 16 (layer4 stride 1, dilation 2) or 8 (layer3 dilation 2, layer4
    dilation 4, ``strides = (4, 4, 8, 8, 8)``).
    """

    def __init__(self, depth: int = 50, *, dilate: bool = False, output_stride: int = 16) -> None:
        super().__init__()
        if depth not in _BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(_BLOCKS)}, got {depth}")
        if output_stride not in (8, 16) or (output_stride == 8 and not dilate):
            raise ValueError(f"unsupported output_stride {output_stride} (dilate={dilate})")
        self.name = f"resnet{depth}"
        dil3, dil4 = (1, 1)
        if dilate:
            dil3, dil4 = (1, 2) if output_stride == 16 else (2, 4)
        stride3 = 2 if dil3 == 1 else 1
        n1, n2, n3, n4 = _BLOCKS[depth]

        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = FixedBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = _stage(64, 64, n1, 1, 1)
        self.layer2 = _stage(256, 128, n2, 2, 1)
        self.layer3 = _stage(512, 256, n3, stride3, dil3)
        self.layer4 = _stage(1024, 512, n4, 1, dil4)

        self.channels = (64, 256, 512, 1024, 2048)
        s3 = 8 * stride3
        self.strides = (4, 4, 8, s3, s3)

        # torchvision's init, so that random-init runs (tests, demo) start from sane activations.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def level_modules(self) -> list[list[nn.Module]]:
        return [[self.conv1, self.bn1, self.relu, self.maxpool], [self.layer1], [self.layer2],
                [self.layer3], [self.layer4]]
