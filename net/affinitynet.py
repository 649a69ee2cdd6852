"""AffinityNet (PSA, Ahn & Kwak CVPR 2018; seam_affinitynet spec 3.6-3.7) on any backbone of the contract.

The network embeds every pixel of the backbone's stride-8 grid; the affinity of two pixels is
``exp(-mean_channels |f_i - f_j|)`` (the released code's mean, not the paper's sum: spec 6 #14). Pairs are
those of ``misc.indexing``'s half disc, so the labels of ``misc.indexing.affinity_labels`` and the walk of
``misc.indexing.walk_affinity`` take its output directly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from net.backbone import Backbone

# PSA's head on ResNet-38: 1x1 convs of conv4 / conv5 / conv6 to 64 / 128 / 256 channels, fused to 448.
HEAD_WIDTHS = (64, 128, 256)
LEVELS = (2, 3, 4)
# PSA's names for those layers, kept so that its released AffinityNet heads load under their own keys.
PROJ_NAMES = ("f8_3", "f8_4", "f8_5")


class AffinityNet(nn.Module):
    """Pixel embeddings ``(B, 448, h, w)`` on the grid of backbone level 2 (stride 8 on every backbone here).

    Levels 2-4 are read through ``Backbone.tap`` (ResNet-38: PSA's conv4 / conv5 / conv6), projected by
    bias-free 1x1 convs + ELU (``f8_3 / f8_4 / f8_5``), resized to level 2's grid and fused by a 1x1 conv +
    ELU (``f9``) (spec 3.6). The
    backbone trains except its stem (level 0), as PSA's does except conv1a / b2.
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone.freeze_levels(1)
        self.stride = backbone.strides[LEVELS[0]]
        for name, level, width in zip(PROJ_NAMES, LEVELS, HEAD_WIDTHS, strict=True):
            setattr(self, name, nn.Conv2d(backbone.channels[level], width, 1, bias=False))
            nn.init.kaiming_normal_(getattr(self, name).weight)
        self.f9 = nn.Conv2d(sum(HEAD_WIDTHS), sum(HEAD_WIDTHS), 1, bias=False)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, 3, H, W)`` normalised, ``H`` and ``W`` multiples of ``stride`` -> ``(B, 448, H/s, W/s)``."""
        feats = self.backbone(x)
        size = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        maps = []
        for name, level in zip(PROJ_NAMES, LEVELS, strict=True):
            m = F.elu(getattr(self, name)(self.backbone.tap(level, feats[level])))
            if tuple(m.shape[-2:]) != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            maps.append(m)
        return F.elu(self.f9(torch.cat(maps, dim=1)))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The trainable backbone at ``lr``, the new layers at ``10 lr`` (spec 2.1)."""
        head = [getattr(self, name).weight for name in (*PROJ_NAMES, "f9")]
        return [{"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr},
                {"params": head, "lr": 10 * lr}]


def feature_affinity(feats: Tensor, offsets: Tensor) -> Tensor:
    """Affinities ``(B, K, h, w)`` of every pixel with its neighbour ``p + offsets[k]`` (``offsets (K, 2)``
    ``(dy, dx)``, ``dy >= 0``) from embeddings ``feats (B, C, h, w)``: ``exp(-mean_c |f_p - f_q|)``, and 0
    where the neighbour is outside the map. Differentiable."""
    b, c, h, w = feats.shape
    r = int(offsets.abs().max()) if len(offsets) else 0
    padded = F.pad(feats, (r, r, 0, r))
    inside = F.pad(feats.new_ones(1, 1, h, w), (r, r, 0, r))
    out = []
    for dy, dx in offsets.tolist():
        window = (slice(None), slice(None), slice(dy, dy + h), slice(r + dx, r + dx + w))
        aff = torch.exp(-(feats - padded[window]).abs().mean(dim=1))
        out.append(aff * inside[window][:, 0])
    return torch.stack(out, dim=1)


def source_affinity(feats: Tensor, path_index: Any) -> Tensor:
    """Affinities ``(B, K, n_sources)`` of a ``misc.indexing.PathIndex``'s pairs on the map ``feats
    (B, C, h, w)``, in the layout of ``misc.indexing.affinity_labels`` (training)."""
    rows, cols = path_index.source_shape
    r = path_index.r
    aff = feature_affinity(feats, path_index.offsets)[:, :, :rows, r:r + cols]
    return aff.reshape(aff.shape[0], aff.shape[1], -1)


def affinity_loss(aff: Tensor, bg_pos: Tensor, fg_pos: Tensor, neg: Tensor) -> dict[str, Tensor]:
    """PSA's loss (spec 3.7) of affinities and pair labels, all ``(B, K, n)``, each term averaged over the
    whole batch's pairs of its kind: ``total = bg/4 + fg/4 + neg/2``."""
    pos_loss = -torch.log(aff + 1e-5)
    bg = (bg_pos * pos_loss).sum() / (bg_pos.sum() + 1e-5)
    fg = (fg_pos * pos_loss).sum() / (fg_pos.sum() + 1e-5)
    neg_term = (neg * -torch.log(1 + 1e-5 - aff)).sum() / (neg.sum() + 1e-5)
    return {"total": bg / 4 + fg / 4 + neg_term / 2, "bg": bg, "fg": fg, "neg": neg_term}


def alpha_threshold(alpha: float) -> float:
    """The CAM score ``m`` below which PSA's background ``(1 - m)^alpha`` beats the best class: the root of
    ``(1 - m)^alpha = m`` (spec 2.5; 4 -> 0.2755, 32 -> 0.0770)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (1 - mid) ** alpha > mid else (lo, mid)
    return (lo + hi) / 2


def threshold_alpha(threshold: float) -> float:
    """The inverse of :func:`alpha_threshold`: ``alpha = ln(t) / ln(1 - t)``."""
    return math.log(threshold) / math.log(1 - threshold)
