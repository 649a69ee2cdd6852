"""SEAM (Wang et al., CVPR 2020; seam_affinitynet spec 4.1-4.3): the network with its pixel correlation
module (PCM), and the siamese losses.

Names: ``fc8`` (classifier, ``num_classes + 1`` channels, channel 0 = background, never classified),
``f8_3`` / ``f8_4`` (the PCM's projections of backbone levels 2 / 3) and ``f9`` (the PCM embedding) are the
released SEAM network's, so its ResNet-38 files load under their own keys (``misc.convert``). On ResNet-38 the
levels read through ``Backbone.tap`` are PSA's conv4 / conv5 / conv6, so the network is the paper's; on other
backbones the same levels 2 / 3 / 4 are read, levels 2 and 3 resized to level 4's grid where they differ.

Memory: the PCM's affinity is a dense ``(B, h*w, h*w)`` float32 matrix on the CAM grid, and autograd keeps
about three of them per image for backward: at a 448 crop on ResNet-38 (56 x 56 grid) that is 3136^2 * 4 B =
39 MB each, ~120 MB per image of branch 1 (branch 2's 17 x 17 grid is negligible). Inference builds one per
image and scale: a 500 x 375 photo at scale 2 (125 x 94 grid) needs 0.55 GB per matrix, and it grows with the
fourth power of the image side, so ``--cam_max_side`` bounds it (1280 px: 160 x 120 grid, 1.5 GB per matrix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from net.backbone import Backbone

# The PCM reads two lower levels (PSA's conv4 / conv5 on ResNet-38) through 1x1 convs to 64 / 128 channels;
# with the 3 image channels they make f9's 195 inputs, embedded in 192 dimensions (spec 4.1).
PCM_LEVELS = (2, 3)
PCM_NAMES = ("f8_3", "f8_4")
PCM_WIDTHS = (64, 128)
PCM_EMBED = 192
EPS = 1e-5  # the reference's guard in every normalisation (kept: it sets the tiny offsets the tests check)


class SEAMNet(nn.Module):
    """SEAM's CAM network: ``fc8`` on ``tap(4)`` and the PCM on ``tap(2)``, ``tap(3)`` and the image.

    ``frozen_levels``: ``Backbone.freeze_levels`` (the caller passes the plain CAM network's choice for the
    backbone; ResNet-38: 1, SEAM's conv1a / b2*). ``forward(x)`` gives the ``(B, num_classes)`` logits (the
    CAM-method contract, used by ``train_cam``'s validation); ``forward(x, maps=True)`` gives SEAM's
    ``(cam, cam_rv)``, what the losses and the CAMs read.
    """

    def __init__(self, backbone: Backbone, num_classes: int, frozen_levels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone.freeze_levels(frozen_levels)
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout)
        self.fc8 = nn.Conv2d(backbone.channels[4], num_classes + 1, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)
        for name, level, width in zip(PCM_NAMES, PCM_LEVELS, PCM_WIDTHS, strict=True):
            setattr(self, name, nn.Conv2d(backbone.channels[level], width, 1, bias=False))
            nn.init.kaiming_normal_(getattr(self, name).weight)
        self.f9 = nn.Conv2d(3 + sum(PCM_WIDTHS), PCM_EMBED, 1, bias=False)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

    def head_modules(self) -> list[nn.Module]:
        """The layers SEAM adds to the backbone (10x learning rate)."""
        return [self.fc8, *(getattr(self, name) for name in PCM_NAMES), self.f9]

    def raw_cam(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``x (B, 3, H, W)`` normalised -> ``(cam (B, C+1, h, w)`` raw (no ReLU; dropout in training), the
        backbone's five level maps)."""
        feats = self.backbone(x)
        return self.fc8(self.dropout(self.backbone.tap(4, feats[4]))), feats

    def pcm_features(self, x: Tensor, feats: list[Tensor], size: tuple[int, int]) -> Tensor:
        """The PCM's feature map ``(B, 195, *size)``: the image resized to the CAM grid (align_corners True,
        as the reference), ``ReLU(f8_3(tap 2))`` and ``ReLU(f8_4(tap 3))``.

        The taps are detached: the backbone learns from classification and ER only (spec 4.1). A level on
        another grid is resized first; the 1x1 conv commutes with that resize, so only the ReLU sees the
        resized map.
        """
        maps = [F.interpolate(x, size, mode="bilinear", align_corners=True)]
        for name, level in zip(PCM_NAMES, PCM_LEVELS, strict=True):
            f = self.backbone.tap(level, feats[level]).detach()
            if tuple(f.shape[-2:]) != size:
                f = F.interpolate(f, size, mode="bilinear", align_corners=False)
            maps.append(F.relu(getattr(self, name)(f)))
        return torch.cat(maps, 1)

    def forward(self, x: Tensor, maps: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``x (B, 3, H, W)`` normalised RGB.

        ``maps=False``: logits ``(B, num_classes)``, the global average of the raw cam's foreground channels
        upsampled to ``H x W`` (align_corners True): exactly the logits of SEAM's classification loss.
        ``maps=True``: ``(cam, cam_rv)``, both ``(B, num_classes + 1, h, w)`` on the CAM grid (level 4's);
        ``cam`` raw, ``cam_rv`` the PCM-refined map (non-negative). Upsampling is the caller's.
        """
        cam, feats = self.raw_cam(x)
        if not maps:
            return class_logits(upsample(cam, tuple(x.shape[-2:])))
        size = (cam.shape[2], cam.shape[3])
        features = self.pcm_features(x, feats, size)
        # fp32 whatever autocast says: the column sums add up thousands of similarities.
        with torch.autocast(x.device.type, enabled=False):
            theta = self.f9(features.float())
            cam_rv = pcm_propagate(pcm_input(cam.float()), pcm_affinity(theta))
        return cam, cam_rv

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters, the new layers' parameters), as ``CAMNet.param_groups``, for the
        1x / 10x learning rates of ``methods.cam.cam_optimizer`` (spec 4.1: fc8, f8_3, f8_4, f9 at 10x)."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return backbone, [p for m in self.head_modules() for p in m.parameters()]


# ------------------------------------------------------------------------------------------------ PCM


@torch.no_grad()
def pcm_input(cam: Tensor) -> Tensor:
    """The map the PCM propagates, from the raw ``cam (B, C+1, h, w)``; same shape, no gradient (spec 4.1).

    ``c = ReLU(cam)`` max-normalised per channel; background = 1 - the top foreground value (over every
    foreground channel: no label mask, as the reference, spec 6 #15); each pixel keeps only its top
    foreground class (ties keep all).
    """
    c = F.relu(cam)
    c = F.relu(c - EPS) / (c.amax((2, 3), keepdim=True) + EPS)
    fg = c[:, 1:]
    top = fg.amax(1, keepdim=True)
    fg = torch.where(fg < top, torch.zeros_like(fg), fg)
    return torch.cat([1 - top, fg], 1)


def pcm_affinity(theta: Tensor) -> Tensor:
    """PCM embeddings ``theta (B, D, h, w)`` -> ``W (B, n, n)``, ``n = h*w``, ``W[b, i, j] = S_ij / (sum_i S_ij
    + 1e-5)`` with ``S_ij = ReLU(cos(theta_i, theta_j))``: columns sum to 1 (up to the 1e-5)."""
    t = theta.flatten(2)
    t = t / (t.norm(dim=1, keepdim=True) + EPS)
    s = F.relu(t.transpose(1, 2) @ t)
    return s / (s.sum(1, keepdim=True) + EPS)


def pcm_propagate(cam: Tensor, w: Tensor) -> Tensor:
    """``cam (B, K, h, w)``, ``W (B, h*w, h*w)`` -> ``y (B, K, h, w)``, ``y_j = sum_i cam_i W_ij``: each pixel
    the similarity-weighted average of the map over the whole image."""
    b, k, h, width = cam.shape
    return (cam.flatten(2) @ w).view(b, k, h, width)


# --------------------------------------------------------------------------------------------- losses


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, K, h, w)`` -> ``(B, K, *size)``, bilinear with align_corners True (SEAM's resizes of its maps)."""
    return F.interpolate(maps, size, mode="bilinear", align_corners=True)


def siamese_input(imgs: Tensor, scale: float) -> Tensor:
    """Branch 2's images: the normalised batch ``(B, 3, H, W)`` scaled by ``scale`` (bilinear, align_corners
    True) to ``(B, 3, floor(H scale), floor(W scale))``; 448 -> 134 at 0.3 (spec 4.2)."""
    return F.interpolate(imgs, scale_factor=scale, mode="bilinear", align_corners=True)


def class_logits(cam: Tensor) -> Tensor:
    """``cam (B, C+1, H, W)`` -> ``(B, C)``: the global average of the foreground channels (background is
    never classified)."""
    return cam.mean((2, 3))[:, 1:]


def max_norm(p: Tensor) -> Tensor:
    """Per (image, channel) min-max normalisation of ``ReLU(p)``, ``(B, K, H, W)`` -> same, in [0, 1) (spec 4.2)."""
    p = F.relu(p)
    lo, hi = p.amin((2, 3), keepdim=True), p.amax((2, 3), keepdim=True)
    return F.relu(p - lo - EPS) / (hi - lo + EPS)


def with_background(p: Tensor) -> Tensor:
    """``(B, C+1, H, W)`` -> the same with channel 0 replaced by 1 - the foreground max (out of place)."""
    fg = p[:, 1:]
    return torch.cat([1 - fg.amax(1, keepdim=True), fg], 1)


def max_onehot(p: Tensor) -> Tensor:
    """``(B, C+1, H, W)`` -> channel 0 kept, each pixel's foreground channels zeroed except its top value
    (ties keep all). Out of place: the reference's in-place version also changed its input (spec 6 #16)."""
    fg = p[:, 1:]
    fg = torch.where(fg == fg.amax(1, keepdim=True), fg, torch.zeros_like(fg))
    return torch.cat([p[:, :1], fg], 1)


def ohem_count(elements: int, ratio: float) -> int:
    """How many of a sample's ``elements`` ECR values are averaged: ``floor(ratio * elements)``, at least 1
    (21 x 134 x 134 at 0.2: 75,415)."""
    return max(1, int(ratio * elements))


def ohem_mean(t: Tensor, ratio: float) -> Tensor:
    """Mean of each sample's ``ohem_count`` largest values of ``t (B, ...)`` over all ``B * k`` of them."""
    flat = t.flatten(1)
    return flat.topk(ohem_count(flat.shape[1], ratio), dim=1).values.mean()


def min_pool_loss(maps: Tensor) -> Tensor:
    """SEAM's min-pool term of foreground maps ``(B, C, H, W)``: per pixel the top class, the ``H*W // 4``
    smallest of those per image, their ReLU summed over ``k * B`` (spec 4.3)."""
    top = maps.amax(1).flatten(1)
    k = max(1, top.shape[1] // 4)
    return F.relu(top.topk(k, dim=1, largest=False).values).sum() / (k * top.shape[0])


def seam_losses(net: nn.Module, imgs: Tensor, labels: Tensor, scale: float = 0.3,
                ohem_ratio: float = 0.2) -> dict[str, Tensor]:
    """SEAM's loss of a batch (spec 4.2-4.3): ``imgs (B, 3, H, W)`` normalised, ``labels (B, C)`` multi-hot.

    ``net(x, maps=True)`` runs branch 1 on ``imgs`` and branch 2 on them scaled by ``scale``; the maps are
    upsampled to each branch's input size and branch 1's brought to branch 2's size by the same resize (the
    transform A). Every term is a mean over the batch, so a batch of originals and CDA composites averages
    each loss over both (spec 5). Returns ``{"loss": cls + rvmin + er + ecr, "cls", "rvmin", "er", "ecr"}``,
    ``cls`` and ``rvmin`` averaged over the two branches.
    """
    img2 = siamese_input(imgs, scale)
    size1, size2 = (imgs.shape[2], imgs.shape[3]), (img2.shape[2], img2.shape[3])
    y = torch.cat([labels.new_ones(labels.shape[0], 1), labels], 1)[:, :, None, None].float()
    cls, rvmin, norm, norm_rv = [], [], [], []
    for x, size in ((imgs, size1), (img2, size2)):
        cam, cam_rv = net(x, maps=True)
        cam, cam_rv = upsample(cam.float(), size), upsample(cam_rv.float(), size)
        cls.append(F.multilabel_soft_margin_loss(class_logits(cam), labels.float()))
        rvmin.append(min_pool_loss((cam_rv * y)[:, 1:]))
        norm.append(max_norm(cam))
        norm_rv.append(max_norm(cam_rv))
    # Branch 1's maps through the transform: the same 0.3 resize as its input (sizes match by construction).
    hat1, rv1 = upsample(norm[0], size2) * y, upsample(norm_rv[0], size2) * y
    hat2, rv2 = norm[1] * y, norm_rv[1] * y
    er = (hat1[:, 1:] - hat2[:, 1:]).abs().mean()
    # ECR: each branch's PCM output against the other's raw CAM, one-hot on its top class, as a fixed target.
    target1, target2 = (max_onehot(with_background(h.detach())) for h in (hat2, hat1))
    ecr = ohem_mean((target1 - rv1).abs(), ohem_ratio) + ohem_mean((target2 - rv2).abs(), ohem_ratio)
    cls_loss, rvmin_loss = (cls[0] + cls[1]) / 2, (rvmin[0] + rvmin[1]) / 2
    return {"loss": cls_loss + rvmin_loss + er + ecr, "cls": cls_loss, "rvmin": rvmin_loss, "er": er, "ecr": ecr}
