"""ORANDNet's network (orandnet spec 6.1): a classic FCN-8s on the VGG-16 layout, one map in, one map out.

It maps one class's OR map ``(N, 1, H, W)`` to a map of the same size ``(N, 1, H, W)`` (logits; the ORAND
CAM is their ReLU, max-normalised). The first convolution pads by 100 so that the 7x7 ``fc6`` always has
input, as in the FCN-8s of Long et al.; the decoder's crops are centred per dimension (the reference takes
the height's offset for both, spec 11.8), so the output is exactly ``(H, W)`` for any, also odd, size.

``width`` scales every channel count (1.0 is the spec's network, whose conv1_2 ... fc7 can start from
torchvision's ImageNet VGG-16; smaller widths are for CPU runs and always start from random weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# VGG-16's conv blocks: output channels of each 3x3 conv, block by block (a 2x2 max pool ends each block).
VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
FC_CHANNELS = 4096
# torchvision's ``vgg16`` keys of the 13 convolutions (``features.<i>``) and of fc6 / fc7 (``classifier.<i>``).
VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG_FC_INDICES = (0, 3)


def bilinear_kernel(size: int) -> torch.Tensor:
    """A ``(size, size)`` bilinear upsampling kernel (the FCN deconvolutions' initial weights)."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float32)
    filt = 1 - (og - center).abs() / factor
    return filt[:, None] * filt[None, :]


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centred ``(height, width)`` window of ``x (N, C, H', W')`` (``H' >= height``, ``W' >= width``); the
    offset is computed per dimension."""
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    if top < 0 or left < 0:
        raise ValueError(f"cannot crop {tuple(x.shape[-2:])} to {(height, width)}")
    return x[..., top : top + height, left : left + width]


class FCN8s(nn.Module):
    """FCN-8s with ``in_channels`` inputs and ``num_outputs`` score maps (ORANDNet: 1 and 1).

    ``forward(x (N, in_channels, H, W)) -> (N, num_outputs, H, W)``.
    """

    def __init__(self, in_channels: int = 1, num_outputs: int = 1, width: float = 1.0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.width = width

        def ch(c: int) -> int:
            return max(1, int(round(c * width)))

        convs: list[nn.Conv2d] = []
        cin = in_channels
        for block in VGG_BLOCKS:
            for cout in block:
                # Padding 100 on the very first convolution only: the input grows by 198 pixels, so even a
                # tiny map leaves fc6's 7x7 window an input after five poolings.
                convs.append(nn.Conv2d(cin, ch(cout), 3, padding=100 if not convs else 1))
                cin = ch(cout)
        self.convs = nn.ModuleList(convs)
        self.block_sizes = tuple(len(b) for b in VGG_BLOCKS)
        self.fc6 = nn.Conv2d(ch(512), ch(FC_CHANNELS), 7)
        self.fc7 = nn.Conv2d(ch(FC_CHANNELS), ch(FC_CHANNELS), 1)
        self.drop = nn.Dropout2d(0.5)
        self.score_final = nn.Conv2d(ch(FC_CHANNELS), num_outputs, 1)
        self.score_pool4 = nn.Conv2d(ch(512), num_outputs, 1)
        self.score_pool3 = nn.Conv2d(ch(256), num_outputs, 1)
        self.up2 = nn.ConvTranspose2d(num_outputs, num_outputs, 4, stride=2, bias=False)
        self.up2_pool4 = nn.ConvTranspose2d(num_outputs, num_outputs, 4, stride=2, bias=False)
        self.up8 = nn.ConvTranspose2d(num_outputs, num_outputs, 16, stride=8, bias=False)
        for layer in (*self.convs, self.fc6, self.fc7):
            # He-normal, not PyTorch's default (uniform, a quarter of the variance): through 15 ReLU layers
            # without normalisation the default shrinks the signal until the output ignores the input, and a
            # network not started from VGG-16 (small widths, no weights given) barely learns (measured: the
            # loss of tests/test_orand.py's fixed image moves by 1e-5 in 20 steps instead of halving).
            # VGG-16's weights replace it where given; conv1_1 keeps it (the reference: PyTorch's default).
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        for score in (self.score_final, self.score_pool4, self.score_pool3):
            nn.init.xavier_normal_(score.weight)
            nn.init.zeros_(score.bias)
        for up in (self.up2, self.up2_pool4, self.up8):
            # Per-channel bilinear kernels (no mixing across outputs); trainable, as in the reference.
            kernel = bilinear_kernel(up.kernel_size[0])
            with torch.no_grad():
                up.weight.zero_()
                for c in range(num_outputs):
                    up.weight[c, c] = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pools = []
        i = 0
        for n in self.block_sizes:
            for _ in range(n):
                x = F.relu(self.convs[i](x))
                i += 1
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            pools.append(x)
        pool3, pool4 = pools[2], pools[3]
        x = self.drop(F.relu(self.fc6(x)))
        x = self.drop(F.relu(self.fc7(x)))
        x = self.up2(self.score_final(x))
        x = x + center_crop(self.score_pool4(pool4), *x.shape[-2:])
        x = self.up2_pool4(x)
        x = x + center_crop(self.score_pool3(pool3), *x.shape[-2:])
        return center_crop(self.up8(x), h, w)

    def load_vgg16(self, state: dict[str, torch.Tensor]) -> None:
        """Initialise conv1_2 ... conv5_3, fc6 and fc7 from torchvision's ``vgg16`` state dict (``width`` 1
        only); conv1_1 (one input channel, not three) keeps its random init, as the reference's."""
        if self.width != 1.0:
            raise ValueError("VGG-16 weights fit only the full-width network (width 1.0)")
        with torch.no_grad():
            for conv, index in list(zip(self.convs, VGG_CONV_INDICES, strict=True))[1:]:
                conv.weight.copy_(state[f"features.{index}.weight"])
                conv.bias.copy_(state[f"features.{index}.bias"])
            for fc, index in zip((self.fc6, self.fc7), VGG_FC_INDICES, strict=True):
                fc.weight.copy_(state[f"classifier.{index}.weight"].view_as(fc.weight))
                fc.bias.copy_(state[f"classifier.{index}.bias"])

