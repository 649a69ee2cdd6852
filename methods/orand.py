"""ORANDNet (orandnet spec 5-7) as a CAM method: ``--cam_method orand --orand_sources DIR_A DIR_B``.

Where it plugs in. ORANDNet trains no classifier on images: it ensembles two finished CAM stores (any two
folders of the standard CAM files: a plain-CAM round's and a PPL run's ``cam/``, or CAMs made elsewhere and
converted with ``python -m misc.cam_store convert``). It is a CAM method because its output is what a CAM
method's is, the round's ``<round>/cam`` store that the refiner reads; its steps replace
``train_cam`` / ``make_cam``, so the refiner (IRN, spec 7) and the segmenter run after it unchanged:

- ``combine_cams``: the OR and AND stores of the two sources (``misc.cam_store``, spec 5) for the training
  list, in ``<round>/orand/{or,and}``; the classes are each image's label (a source may hold more);
- ``eval_or_and``: scores both as eval_cam does (rows ``eval_or_cam``, ``eval_and_cam``, with precision and
  recall, spec 9), the two ends the ORAND CAM lies between;
- ``train_orandnet``: the FCN-8s (``net.orandnet``, spec 6.1) learns to map a class's OR map to its AND map,
  one image per iteration (spec 6.2), through the pipeline's training loop (exact resume);
- ``make_orand_cam``: ``relu(FCN(OR_c))`` max-normalised (``sigmoid``, min-max, after ``bce``), into
  ``<round>/cam`` (spec 6.3);
- ``eval_cam``: the ORAND CAM's row (and, with ``--calibrate_thresholds``, the refiner's thresholds).

Not supported: CDA (``--cda true``). CDA retrains a CAM method's classifier on copy-pasted images, and
ORANDNet has no image classifier to retrain; run CDA in the runs that make the source stores instead.
The paper's ViT source (DeiT-B/16 relevance maps, spec 4) is ``--cam_method vit`` (``methods.vit``): run it in
a work dir of its own and give its ``<round>/cam`` as DIR_B with ``--orand_offset 0.15``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import CAMMethod
from misc.cam_store import normalise, strided_size
from misc.errors import UserError
from misc.io import load_cam
from misc.train import Stage
from misc.weights import resolve_weights
from net.backbone import read_checkpoint
from net.orandnet import FCN8s

LOSSES = ("softmax_ce", "bce")
NO_CLASSIFIER = ("--cam_method orand trains no CAM network: its steps are combine_cams, eval_or_and, train_orandnet, "
                 "make_orand_cam and eval_cam, which replace train_cam / make_cam")


class ORANDNet(CAMMethod):
    """``--cam_method orand``: the OR -> AND FCN over two CAM stores (see the module docstring)."""

    name = "orand"
    steps = (
        ("combine_cams", "combine_cams"),
        ("eval_or_and", "eval_or_and"),
        ("train_orandnet", "train_orandnet"),
        ("make_orand_cam", "make_orand_cam"),
        ("eval_cam", "eval_cam"),
    )
    settings = ("orand_offset", "orandnet_iters", "orandnet_learning_rate", "orandnet_loss", "orandnet_width",
                "orandnet_weights")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("ORANDNet (--cam_method orand, orandnet spec 5-7)")
        g.add_argument("--orand_sources", nargs=2, default=None, metavar=("DIR_A", "DIR_B"),
                       help="the two CAM stores to ensemble (folders of <id>.npz in the standard format; "
                            "python -m misc.cam_store convert makes one from the reference's .npy files)")
        g.add_argument("--orand_offset", type=float, default=0.0,
                       help="added to DIR_B's maps before OR / AND (spec 5: 0.15 for a ViT's maps, 0 for two "
                            "CAMs of one kind)")
        g.add_argument("--orandnet_iters", type=int, default=None, help="FCN training iterations (voc: 5000)")
        g.add_argument("--orandnet_learning_rate", type=float, default=1e-3)
        g.add_argument("--orandnet_loss", choices=LOSSES, default="softmax_ce",
                       help="softmax_ce: the reference's soft-target CE over the image's classes (0 for an "
                            "image of one class); bce: per-class sigmoid BCE against AND (proposed)")
        g.add_argument("--orandnet_width", type=float, default=None,
                       help="channel multiplier of the FCN-8s (1: the paper's; the demo's 0.125 fits a CPU)")
        g.add_argument("--orandnet_weights", default="none",
                       help="torchvision VGG-16 ImageNet weights for conv1_2..fc7 (path or registry name; "
                            "width 1 only), or none: random init")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> str | None:
        if args.orand_sources is None:
            return "--cam_method orand needs --orand_sources DIR_A DIR_B (the two CAM stores to ensemble)"
        if args.cda:
            return ("--cam_method orand has no image classifier for CDA to retrain: pass --cda false (run CDA in "
                    "the runs that make the source stores)")
        if args.cam_weights:
            return "--cam_weights has no use with --cam_method orand (it trains no CAM network)"
        ours = (Path(args.work_dir) / "baseline" / "cam").resolve()
        for source in args.orand_sources:
            if not Path(source).is_dir():
                return f"--orand_sources: {source} is not a folder of CAM files"
            if Path(source).resolve() == ours:
                return (f"--orand_sources: {source} is this run's own CAM folder, which the ORAND CAMs overwrite: "
                        "copy it elsewhere or run in another --work_dir")
        if args.orandnet_iters is not None and args.orandnet_iters < 1:
            return f"--orandnet_iters must be >= 1, got {args.orandnet_iters}"
        if args.orandnet_width is not None and args.orandnet_width <= 0:
            return f"--orandnet_width must be positive, got {args.orandnet_width}"
        if str(args.orandnet_weights).lower() != "none" and args.orandnet_width not in (None, 1.0):
            return "--orandnet_weights (VGG-16) fit only --orandnet_width 1"
        return None

    # The generic CAM steps never run for this method (its own steps replace them); should one be called
    # (train_cam / make_cam run by hand with --cam_method orand), it says why instead of failing deep inside.
    def build(self, args: argparse.Namespace, num_classes: int) -> nn.Module:
        raise UserError(NO_CLASSIFIER)

    def stages(self, args: argparse.Namespace, steps_per_epoch: int,
               poly_length: Callable[[int], int]) -> list[Stage]:
        raise UserError(NO_CLASSIFIER)


def orand_paths(args: argparse.Namespace) -> dict[str, Path]:
    """This round's ORANDNet files: the OR and AND stores and the FCN weights."""
    root = Path(args.work_dir) / args.variant
    return {"or": root / "orand" / "or", "and": root / "orand" / "and", "weights": root / "sess" / "orandnet.pth"}


def build_orandnet(args: argparse.Namespace, pretrained: bool = True) -> FCN8s:
    """The FCN on the CPU; with ``pretrained``, conv1_2 ... fc7 from ``--orandnet_weights`` (VGG-16) if given."""
    model = FCN8s(1, 1, args.orandnet_width)
    weights = resolve_weights(args.orandnet_weights) if pretrained else None
    if weights is not None:
        model.load_vgg16(read_checkpoint(weights))
    return model


class OrAndPairs(torch.utils.data.Dataset):
    """One image's OR maps (the input) and AND maps (the target) at full resolution, as stored.

    Item: ``{'name', 'or': float32 (k, H, W), 'and': float32 (k, H, W)}`` (k = the image's classes). No
    augmentation (spec 6.2), so ``set_epoch`` has nothing to reseed.
    """

    def __init__(self, ids: list[str], or_dir: Path, and_dir: Path) -> None:
        self.ids, self.or_dir, self.and_dir = list(ids), Path(or_dir), Path(and_dir)

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """The training loop's per-epoch hook: nothing here depends on the epoch."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.ids[index]
        a, b = load_cam(self.or_dir / f"{name}.npz"), load_cam(self.and_dir / f"{name}.npz")
        return {"name": name, "or": torch.from_numpy(a["high_res"]), "and": torch.from_numpy(b["high_res"])}


def fcn_per_class(net: nn.Module, maps: torch.Tensor) -> torch.Tensor:
    """Run the 1-channel FCN on each class map of ``maps (k, H, W)`` (as a batch of k): logits ``(k, H, W)``."""
    return net(maps[:, None])[:, 0]


def orand_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "softmax_ce") -> torch.Tensor:
    """ORANDNet's loss of one image: logits and AND targets ``(k, H, W)`` over its k classes.

    ``softmax_ce`` (spec 6.2): ``-mean_pixels sum_c AND_c log softmax_c(logits)``, the targets not
    normalised and no background channel, so for k = 1 the softmax is 1 and loss and gradient are 0 (as
    the reference: only multi-class images train it). ``bce``: the mean per-pixel sigmoid BCE against
    AND clipped to [0, 1] (with an offset AND reaches 1.15).
    """
    if kind == "softmax_ce":
        return -(target * F.log_softmax(logits, dim=0)).sum(0).mean()
    if kind == "bce":
        if logits.numel() == 0:
            return logits.sum()  # an image without a class: 0, still attached to the graph
        return F.binary_cross_entropy_with_logits(logits, target.clamp(0, 1))
    raise ValueError(f"unknown ORANDNet loss {kind!r}: choose one of {', '.join(LOSSES)}")


@torch.no_grad()
def orand_cam(net: nn.Module, or_maps: torch.Tensor, loss: str = "softmax_ce") -> tuple[torch.Tensor, torch.Tensor]:
    """The ORAND CAM of one image (spec 6.3) from its OR maps ``(k, H, W)``: the FCN's map divided by its max
    (+1e-5) per class; returns ``(cam (k, H4, W4) bilinear, high_res (k, H, W))``, float32.

    The map is ``relu(FCN(OR_c))`` for the reference's ``softmax_ce`` (its logits have no fixed sign), and
    ``sigmoid(FCN(OR_c))``, min-max normalised, for an FCN trained with ``bce``: that network predicts AND
    through a sigmoid, and since AND is small on most pixels its logits are mostly negative, which a ReLU
    zeroes (measured on the demo: every ORAND map all zero); the sigmoid's floor carries no location, so it
    is subtracted.
    """
    h, w = or_maps.shape[-2:]
    if or_maps.shape[0] == 0:
        return or_maps.new_zeros((0, *strided_size(h, w))), or_maps.new_zeros((0, h, w))
    logits = fcn_per_class(net, or_maps).float()
    bce = loss == "bce"
    high = normalise(torch.sigmoid(logits) if bce else F.relu(logits), subtract_min=bce)
    cam = F.interpolate(high[None], strided_size(h, w), mode="bilinear", align_corners=False)[0]
    return cam, high

