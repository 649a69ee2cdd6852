"""VGG-16 at output stride 8, as RCA modifies it (rca spec 4.1), with torchvision's ``vgg16`` key names.

torchvision's ``features`` list with pool4 turned into a 3x3 max pool of stride 1 (padding 1: no
downsampling), conv5_1..5_3 dilated by 2 and pool5 dropped; the indices of the kept layers are torchvision's,
so ``vgg16-397923af.pth`` loads unchanged once its ``classifier.*`` (fc6-fc8) keys are skipped. No BatchNorm.

=====  ===========================================  ========  ======
level  modules (``features`` indices)               channels  stride
=====  ===========================================  ========  ======
0      conv1_1, conv1_2, pool1 (0-4)                64        2
1      conv2_1, conv2_2, pool2 (5-9)                128       4
2      conv3_1..3_3, pool3 (10-16)                  256       8
3      conv4_1..4_3, 3x3 pool of stride 1 (17-23)   512       8
4      conv5_1..5_3, dilation 2 (24-29)             512       8
=====  ===========================================  ========  ======

Every level ends activated, so ``tap`` is the identity. A 368 x 368 input gives a 46 x 46 level 4.
"""

from __future__ import annotations

from torch import nn

from net.backbone import Backbone
from net.orandnet import VGG_BLOCKS

# Index of the last ``features`` module of each level: pool1, pool2, pool3, the stride-1 pool4, conv5_3's ReLU.
_LEVEL_ENDS = (4, 9, 16, 23, 29)
VGG_HEAD_PREFIXES: tuple[str, ...] = ("classifier.",)


class VGG16(Backbone):
    """VGG-16 conv1_1..conv5_3 at output stride 8 (see the module docstring)."""

    name = "vgg16"
    head_prefixes = VGG_HEAD_PREFIXES

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for block, widths in enumerate(VGG_BLOCKS):
            dilation = 2 if block == 4 else 1
            for width in widths:
                layers += [nn.Conv2d(in_ch, width, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
                in_ch = width
            if block < 3:
                layers.append(nn.MaxPool2d(2, 2))
            elif block == 3:
                layers.append(nn.MaxPool2d(3, 1, padding=1))
        self.features = nn.Sequential(*layers)
        self.channels = tuple(widths[-1] for widths in VGG_BLOCKS)
        self.strides = (2, 4, 8, 8, 8)
        # torchvision's init, so that random-init runs (tests) start from sane activations; the ImageNet
        # weights overwrite it.
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def level_modules(self) -> list[list[nn.Module]]:
        starts = (0, *(end + 1 for end in _LEVEL_ENDS[:-1]))
        return [list(self.features[a : b + 1]) for a, b in zip(starts, _LEVEL_ENDS, strict=True)]
