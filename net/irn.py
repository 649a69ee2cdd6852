"""IRN: inter-pixel relation network (spec 7), its losses, and the inference helpers of spec 7.6 / 8.1.

Two heads on a frozen backbone, both predicting at stride 4: a boundary (edge) map and a displacement
field. The heads only read the backbone's ``channels`` and ``strides``, so any backbone of the contract
in docs/DESIGN.md works. Head names mirror the reference IRNet's ``fc_edge1..6`` / ``fc_dp1..7`` as
``edge1..edge6`` / ``dp1..dp7`` with the same inner indices (0 = conv, 1 = GroupNorm, ``dp7.3`` = the
final conv) plus the buffer ``mean_shift.running_mean``, so ``misc.weights`` converts released
checkpoints by renaming prefixes only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from misc import dist
from misc.indexing import PathIndex


def _proj(in_ch: int, out_ch: int, groups: int) -> nn.Sequential:
    """``P(in -> out, g)`` of spec 7.1: 1x1 conv without bias, then GroupNorm."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.GroupNorm(groups, out_ch))


def _grid(size: int, stride: int) -> int:
    """Feature size of a stride-``stride`` level for an input side of ``size`` (conv arithmetic)."""
    return (size - 1) // stride + 1


def _resize(x: Tensor, factor: float, size: tuple[int, int]) -> Tensor:
    """Bilinear ``x (B, C, h, w)`` by ``factor``, then fit to ``size``: crop the top-left part, or pad by
    edge replication when a backbone's rounding left the level a pixel short."""
    if factor != 1:
        x = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    x = x[..., : size[0], : size[1]]
    pad_h, pad_w = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x


class MeanShift(nn.Module):
    """Identity in training; in eval mode subtracts the stored mean displacement (spec 7.6)."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, h, w) -> (B, C, h, w)``."""
        return x if self.training else x - self.running_mean.view(1, -1, 1, 1)


class IRN(nn.Module):
    """Boundary and displacement heads on a fully frozen ``backbone`` (spec 7.1)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone.freeze_levels(5)
        ch = tuple(backbone.channels)
        self.strides = tuple(backbone.strides)
        if len(ch) != 5 or len(self.strides) != 5:
            raise ValueError(f"IRN needs a backbone with 5 levels, got channels {ch}, strides {self.strides}")

        self.edge1, self.edge2, self.edge3, self.edge4, self.edge5 = (_proj(c, 32, 4) for c in ch)
        self.edge6 = nn.Conv2d(32 * 5, 1, 1, bias=True)

        self.dp1 = _proj(ch[0], 64, 8)
        self.dp2 = _proj(ch[1], 128, 16)
        self.dp3 = _proj(ch[2], 256, 16)
        self.dp4 = _proj(ch[3], 256, 16)
        self.dp5 = _proj(ch[4], 256, 16)
        self.dp6 = _proj(768, 256, 16)
        self.dp7 = nn.Sequential(*_proj(448, 256, 16), nn.ReLU(inplace=True), nn.Conv2d(256, 2, 1, bias=False))
        self.mean_shift = MeanShift(2)

    def train(self, mode: bool = True) -> IRN:
        """Heads follow ``mode``; the backbone always stays in eval mode (it is frozen)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, 3, H, W)`` normalised -> edge logits ``(B, 1, h4, w4)`` and displacement
        ``(B, 2, h4, w4)`` (channel 0 = dy, 1 = dx, in /4-grid pixels), ``h4 = (H - 1) // 4 + 1``.

        Each level is resized by ``stride / 4`` (``stride / 8`` for the /8 part of the displacement
        branch) and fitted to the grid size implied by the input, so uncommon strides work too.
        """
        with torch.no_grad():  # frozen: keep no activations for backward
            feats = [self.backbone.tap(i, f).detach() for i, f in enumerate(self.backbone(x))]
        s4 = (_grid(x.shape[-2], 4), _grid(x.shape[-1], 4))
        s8 = (_grid(x.shape[-2], 8), _grid(x.shape[-1], 8))

        def level(block: nn.Module, i: int, base: int, size: tuple[int, int]) -> Tensor:
            # Order of spec 7.1: conv -> GN -> upsample -> ReLU.
            return F.relu(_resize(block(feats[i]), self.strides[i] / base, size))

        edges = [level(m, i, 4, s4) for i, m in enumerate((self.edge1, self.edge2, self.edge3, self.edge4,
                                                            self.edge5))]
        edge = self.edge6(torch.cat(edges, dim=1))

        d1, d2 = level(self.dp1, 0, 4, s4), level(self.dp2, 1, 4, s4)
        d3, d4, d5 = level(self.dp3, 2, 8, s8), level(self.dp4, 3, 8, s8), level(self.dp5, 4, 8, s8)
        d6 = F.relu(_resize(self.dp6(torch.cat([d3, d4, d5], dim=1)), 2, s4))
        disp = self.mean_shift(self.dp7(torch.cat([d1, d2, d6], dim=1)))
        return edge, disp

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups of spec 7.5: edge branch at ``lr``, displacement branch at ``10 lr``."""
        edge = [p for n in ("edge1", "edge2", "edge3", "edge4", "edge5", "edge6")
                for p in getattr(self, n).parameters()]
        disp = [p for i in range(1, 8) for p in getattr(self, f"dp{i}").parameters()]
        return [{"params": edge, "lr": lr}, {"params": disp, "lr": 10 * lr}]


def irn_loss(edge_logits: Tensor, displacement: Tensor, bg_pos: Tensor, fg_pos: Tensor, neg: Tensor,
             path_index: PathIndex) -> dict[str, Tensor]:
    """IRN losses of spec 7.4, summed over the whole batch and all pairs.

    ``edge_logits (B, 1, h, w)``, ``displacement (B, 2, h, w)``; ``bg_pos, fg_pos, neg (B, K, n_sources)``
    from :func:`misc.indexing.affinity_labels` on ``path_index``'s grid ``(h, w)``. Returns scalars
    ``pos``, ``neg``, ``dfg``, ``dbg`` and ``total = (pos + neg)/2 + (dfg + dbg)/2``.
    """
    aff = path_index.to_affinity(torch.sigmoid(edge_logits))  # (B, K, n)
    pos_loss = -torch.log(aff + 1e-5)
    neg_loss = -torch.log(1 + 1e-5 - aff)
    bg_loss = (bg_pos * pos_loss).sum() / (bg_pos.sum() + 1e-5)
    fg_loss = (fg_pos * pos_loss).sum() / (fg_pos.sum() + 1e-5)
    pos = (bg_loss + fg_loss) / 2
    neg_term = (neg * neg_loss).sum() / (neg.sum() + 1e-5)

    src, dst = path_index.src_dst(displacement)
    pair_disp = src - dst  # (B, 2, K, n); equals the offset when both ends share a centroid
    target = path_index.offsets.to(pair_disp).t().reshape(1, 2, -1, 1)
    dfg = (fg_pos * (pair_disp - target).abs().sum(dim=1)).sum() / (2 * fg_pos.sum() + 1e-5)
    dbg = (bg_pos * pair_disp.abs().sum(dim=1)).sum() / (2 * bg_pos.sum() + 1e-5)
    total = (pos + neg_term) / 2 + (dfg + dbg) / 2
    return {"pos": pos, "neg": neg_term, "dfg": dfg, "dbg": dbg, "total": total}


@torch.no_grad()
def edge_and_displacement(model: IRN, img: Tensor) -> tuple[Tensor, Tensor]:
    """Spec 8.1 on one normalised image ``img (1, 3, H, W)`` of any size (no padding to 512).

    Returns the edge probability ``(h4, w4)`` (sigmoid of the logits averaged with those of the
    h-flipped image, flipped back) and the displacement ``(2, h4, w4)`` of the unflipped image minus
    ``running_mean``. ``model`` must be in eval mode (that is what subtracts the mean shift).
    """
    if model.training:
        raise ValueError("edge_and_displacement needs the model in eval mode (call model.eval())")
    edge, disp = model(torch.cat([img, img.flip(-1)]))
    edge = torch.sigmoid((edge[0, 0] + edge[1, 0].flip(-1)) / 2)
    return edge, disp[0]


@torch.no_grad()
def estimate_mean_shift(model: IRN, loader: Iterable[Any]) -> Tensor:
    """Set and return ``mean_shift.running_mean`` ``(2,)`` (spec 7.6): the average over batches of the
    per-batch mean displacement. ``loader`` yields normalised images ``(B, 3, H, W)`` or dicts holding
    them under ``"img"``. Leaves the model in eval mode. Under DDP the ranks' results are averaged."""
    model.eval()
    model.mean_shift.running_mean.zero_()
    device = model.mean_shift.running_mean.device
    total = torch.zeros(2, device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for batch in loader:
        img = batch["img"] if isinstance(batch, dict) else batch
        _, disp = model(img.to(device, non_blocking=True))
        total += disp.double().mean(dim=(0, 2, 3))
        count += 1
    # Averaging the sums and the counts separately weighs every batch equally across ranks.
    total, count = dist.all_reduce_mean(total), dist.all_reduce_mean(count)
    if float(count) == 0:
        raise ValueError("estimate_mean_shift got an empty loader")
    mean = total / count
    model.mean_shift.running_mean.copy_(mean.to(model.mean_shift.running_mean.dtype))
    return model.mean_shift.running_mean.clone()
