"""The three kinds of plug-in a round of the pipeline is made of, and what each must provide.

- A **CAM method** trains a classifier on image-level tags and turns it into class activation maps. The
  generic steps ``train_cam`` (with CDA as an option), ``make_cam`` (multi-scale + flip inference into the
  standard CAM files) and ``eval_cam`` run any CAM method through this interface.
- A **refiner** turns a round's CAM files into semantic pseudo masks ``<round>/sem_seg/<id>.png`` (what
  CDA's object bank and the segmenter learn from), by steps of its own.
- A **segmenter** learns from the pseudo masks (or ground truth) and predicts label maps, through the
  generic ``train_deeplab`` / ``eval_deeplab`` steps.

Each plug-in may add flags of its own (``add_arguments``, validated by ``check_args``) and lists its steps
as ``(pass flag, step module)`` pairs; the driver runs them in order, and ``--<pass flag>_pass false``
skips one. See docs/DESIGN.md, "How to add a CAM method / refiner".
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dataset.base import DatasetInfo
from dataset.samples import ClassificationDataset
from misc.pipeline import autocast
from misc.train import Stage

StepList = tuple[tuple[str, str], ...]


class Plugin:
    """What every plug-in may bring besides its steps: flags of its own, and their validation."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the plug-in's own flags (in a group of their own), all defaulting so other plug-ins ignore them."""

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> str | None:
        """Once the plug-in is chosen: why its flags are invalid (a one-line message naming the flag), or None."""
        return None

    @classmethod
    def tags(cls, args: argparse.Namespace) -> dict[str, str]:
        """Once the plug-in is chosen: labels every metrics row of the run carries, for numbers that are not what
        the usual setting measures (extra supervision, an upper bound); none by default."""
        return {}


class CAMMethod(Plugin):
    """A classifier trained on tags whose activation maps are the CAMs.

    ``settings``: the ``args`` fields (beyond the CAM training ones) that shape the trained weights, part
    of the weights' fingerprint. ``steps``: the round's CAM steps (the generic three, unless the method
    brings its own). ``subtract_min``: how make_cam normalises the method's maps. ``presets``: per
    ``--preset``, the flag values of its published recipe (``cam_batch_size``, its own flags...), which win
    over the pipeline preset's for flags the user left unset (as a segmenter's).
    """

    name: ClassVar[str]
    settings: ClassVar[tuple[str, ...]] = ()
    presets: ClassVar[dict[str, dict[str, object]]] = {}
    steps: ClassVar[StepList] = (("train_cam", "train_cam"), ("make_cam", "make_cam"), ("eval_cam", "eval_cam"))
    # make_cam divides each class's fused map by its max; a method whose maps sit on a floor (SEAM's PCM output
    # is a weighted mean over the whole image) subtracts their min first.
    subtract_min: ClassVar[bool] = False
    # make_cam's inference. True: every --cam_scales scale with its flip, fused and resized to the image through
    # IRNet's 16-aligned padding. False: the image once at its own size, no flip, the maps resized straight to
    # the image (a method that resizes the image inside ``cams`` itself: ViT relevance at a fixed input size).
    multi_scale: ClassVar[bool] = True
    # True: make_cam passes the image's classes, ``cams(model, x, classes)`` with ``classes (k,)``, and only those
    # maps are read (the others may stay 0): maps that cost a backward pass per class (ViT relevance).
    per_class: ClassVar[bool] = False
    # ``args`` fields that shape the maps but not the trained weights: part of make_cam's fingerprint.
    cam_settings: ClassVar[tuple[str, ...]] = ()

    def build(self, args: argparse.Namespace, num_classes: int) -> nn.Module:
        """The network on the CPU, its backbone on ``args.backbone_weights`` (ImageNet)."""
        raise NotImplementedError

    def stages(self, args: argparse.Namespace, steps_per_epoch: int,
               poly_length: Callable[[int], int]) -> list[Stage]:
        """The training stages; ``poly_length(n)`` is the poly schedule's length for a stage of ``n`` steps
        (``n``, except for CDA's reference schedule)."""
        raise NotImplementedError

    def losses(self, net: nn.Module, imgs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named losses of a batch: images (B, 3, S, S), multi-hot labels (B, C); the first is optimised."""
        raise NotImplementedError

    def batch_losses(self, net: nn.Module, batch: dict, imgs: torch.Tensor,
                     labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``train_cam``'s call: :meth:`losses` of ``imgs`` / ``labels`` (on the device; with CDA the originals
        then their composites), with the batch as loaded beside them (``name``: the originals' ids). A method
        that keeps per-image state overrides this to read the ids (RCA's accumulated maps)."""
        return self.losses(net, imgs, labels)

    def classification_set(self, args: argparse.Namespace, info: DatasetInfo, ids: list[str],
                           labels: dict[str, np.ndarray], augment: bool) -> ClassificationDataset:
        """``train_cam``'s images of ``ids`` (CDA's composites wrap it, through its ``transform``): the CAM recipe's
        random resize, flip and crop, or with ``augment=False`` (validation) the top-left crop."""
        return ClassificationDataset(info, ids, labels, resize_long=tuple(args.cam_resize_long),
                                     crop_size=args.cam_crop_size, augment=augment, seed=args.seed)

    def cams(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> non-negative class maps (B, C, h, w), unnormalised (``make_cam`` fuses scales,
        flips and normalises). A ``per_class`` method takes ``classes`` (k,) as a third argument."""
        raise NotImplementedError


class Refiner(Plugin):
    """CAM files -> semantic pseudo masks in ``<round>/sem_seg``, by the steps it lists (run in order after
    the CAM steps; ``eval_sem_seg`` scores any refiner's masks).

    A refiner that learns from confident seeds lists the generic ``cam_to_ir_label`` (and
    ``eval_ir_label``) step and gives its rule through :meth:`seed_rule`.
    """

    name: ClassVar[str]
    steps: ClassVar[StepList]

    def seed_rule(self, args: argparse.Namespace) -> tuple[Callable[..., np.ndarray], dict[str, float]]:
        """``(rule, settings)`` for ``cam_to_ir_label``: a module-level function (it runs in worker
        processes) called as ``rule(img (H, W, 3) uint8, high_res (k, H, W), keys (k,), **settings)`` that
        returns the seeds, uint8 ``(H, W)`` with 0 background, ``c + 1``, 255 unsure."""
        raise NotImplementedError(f"refiner {self.name} makes no seeds")


class Segmenter(Plugin):
    """A fully supervised segmentation network trained on the pseudo masks.

    ``build`` returns a module whose ``forward(x (B, 3, H, W), upsample: bool)`` gives logits
    ``(B, num_labels, H, W)`` (at its own stride with ``upsample=False``) and whose ``param_groups()``
    gives (backbone parameters, head parameters) for the 1x / 10x learning rates.

    ``supervisions``: the ``--supervision`` values it learns from; ``tags`` means the masks the CAM rounds
    make (or the ground truth), any other (``points``, ``scribbles``) labels it reads itself through
    :meth:`training_set`, and the driver skips the CAM rounds. ``presets``: per ``--preset``, the flag
    values of its published schedule, which win over the pipeline preset's for flags the user left unset.
    """

    name: ClassVar[str]
    steps: ClassVar[StepList] = (("train_deeplab", "train_deeplab"), ("eval_deeplab", "eval_deeplab"))
    settings: ClassVar[tuple[str, ...]] = ()
    supervisions: ClassVar[tuple[str, ...]] = ("tags",)
    presets: ClassVar[dict[str, dict[str, object]]] = {}

    def build(self, args: argparse.Namespace, num_labels: int, backbone_weights: str | None) -> nn.Module:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training loss of (B, L, H, W) logits against (B, H, W) labels (255 = ignore)."""
        raise NotImplementedError

    def losses(self, net: nn.Module, batch: dict, device: torch.device, amp: bool) -> dict[str, torch.Tensor]:
        """Named losses of a training batch (``img`` (B, 3, S, S), ``label`` (B, S, S), and whatever the
        training set adds); the first is optimised. Default: the network's logits under ``autocast`` against
        the labels by :meth:`loss`. A segmenter whose losses need more than the logits (features, the image,
        image-level classes: AGMM) overrides this, so ``train_deeplab`` stays the one training step."""
        imgs = batch["img"].to(device, non_blocking=True)
        target = batch["label"].to(device, non_blocking=True)
        with autocast(device, amp):
            logits = net(imgs)
        return {"loss": self.loss(logits, target)}

    def training_set(self, args: argparse.Namespace, info: DatasetInfo, ids: list[str]
                     ) -> tuple[Dataset, str, str] | None:
        """``(dataset, fingerprint of its labels, description for the log)`` when the segmenter reads labels
        of its own (``--supervision`` other than tags); None: ``train_deeplab`` trains on the round's pseudo
        masks or the ground truth."""
        return None
