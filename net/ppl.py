"""Progressive Patch Learning's network (docs/ppl.md, spec ``ppl.md`` sections 2-6).

A feature map of backbone level ``p`` is cut into an ``s x s`` grid of patches stacked along the batch
axis; the backbone's own levels ``p+1..4`` process each patch alone (their zero padding stops information
crossing a patch border), the results are put back in place, and the classifier reads them concatenated
with the ordinary (global) path's map:

- **progressive**: one patch level at a time (``set_patch_level``), moved up stage by stage while the
  weights carry over; classifier input ``2 C'``;
- **explicit**: every patch level at once, each branch on a gradient-stopped copy of its level's map;
  classifier input ``(n + 1) C'``.

Because the classifier stays a bias-free 1x1 conv on the concatenated map, ``CAMNet.cam`` gives the CAM of
spec section 6 (``W_global . g_global + sum W_patch . g_patch``) unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from net.backbone import Backbone
from net.cam import CAMNet

VARIANTS: tuple[str, ...] = ("progressive", "explicit")


def split_patches(x: Tensor, grid: int, multiple: int = 1) -> Tensor:
    """``(B, C, H, W)`` -> ``(B * grid**2, C, H' / grid, W' / grid)``, patches in row-major grid order per image.

    ``H, W`` are zero-padded at the bottom/right to ``H', W'``, the next multiples of ``grid * multiple``, so
    every patch side divides by ``multiple`` (the stride the patches will still go through).
    """
    b, c, h, w = x.shape
    step = grid * multiple
    x = F.pad(x, (0, -w % step, 0, -h % step))
    ph, pw = x.shape[2] // grid, x.shape[3] // grid
    x = x.view(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * grid * grid, c, ph, pw)


def merge_patches(patches: Tensor, grid: int, size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`split_patches`: ``(B * grid**2, C, h, w)`` -> ``(B, C, grid*h, grid*w)`` cropped to
    ``size`` (the padding removed)."""
    n, c, ph, pw = patches.shape
    b = n // (grid * grid)
    x = patches.view(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, grid * ph, grid * pw)
    return x[:, :, : size[0], : size[1]]


class PPLNet(CAMNet):
    """A CAM network whose classifier reads the global map and the patch path(s) of ``patch_levels``.

    ``patch_levels``: backbone levels after which the map is cut (``0..3``; the spec's "after layer1, 2, 3"
    of ResNet-50 are ``1, 2, 3``). Progressive: ``patch_level`` is one of them (default the last, the
    structure CAMs are made with). ``frozen_levels``: see ``Backbone.freeze_levels`` (PPL trains the lower
    blocks by default: 1, the stem only).
    """

    def __init__(self, backbone: Backbone, num_classes: int, *, grid: int = 2, patch_levels: Sequence[int] = (1, 2, 3),
                 variant: str = "progressive", frozen_levels: int = 1) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"PPL variant must be one of {VARIANTS}, got {variant!r}")
        if not patch_levels or any(not 0 <= level <= 3 for level in patch_levels) or grid < 1:
            raise ValueError(f"PPL needs patch levels in 0..3 and a grid >= 1, got {list(patch_levels)}, {grid}")
        branches = 2 if variant == "progressive" else len(patch_levels) + 1
        super().__init__(backbone, num_classes, frozen_levels, feature_channels=branches * backbone.channels[-1])
        self.grid = grid
        self.patch_levels = tuple(patch_levels)
        self.variant = variant
        self.patch_level = self.patch_levels[-1]

    def set_patch_level(self, level: int) -> None:
        """Move the progressive variant's patch point (a training stage's structure)."""
        if level not in self.patch_levels:
            raise ValueError(f"patch level {level} is not one of {self.patch_levels}")
        self.patch_level = level

    def patch_path(self, feature: Tensor, level: int, size: tuple[int, int]) -> Tensor:
        """Level ``level``'s map ``(B, C_level, H_l, W_l)`` -> the merged patch-path top map ``(B, C', *size)``.

        Padding the map to patches whose sides divide by the remaining stride keeps every patch output on
        the global grid, so cropping to the global map's ``size`` aligns the two exactly.
        """
        remaining = self.backbone.strides[-1] // self.backbone.strides[level]
        patches = split_patches(feature, self.grid, remaining)
        top = self.backbone(patches, first_level=level + 1)[-1]
        return merge_patches(top, self.grid, size)

    def branch_features(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` -> ``[global, patch path(s)...]``, each ``(B, C', h, w)``."""
        feats = self.backbone(x)
        top = feats[-1]
        size = (top.shape[2], top.shape[3])
        if self.variant == "progressive":
            return [top, self.patch_path(feats[self.patch_level], self.patch_level, size)]
        # Explicit: each branch trains only the blocks above its patch point (spec 4, the figure's "x").
        return [top, *(self.patch_path(feats[level].detach(), level, size) for level in self.patch_levels)]

    def features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, branches * C', h, w)``: the branches concatenated along channels."""
        return torch.cat(self.branch_features(x), 1)
