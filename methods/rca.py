"""RCA (Regional Semantic Contrast and Aggregation, Zhou et al., CVPR 2022; spec rca.md) as a CAM method:
``--cam_method rca``.

Where it plugs in. ``train_cam`` trains the network (``net.rca.RCANet``) through this method's hooks: its
images (``classification_set``: RCA's square resize and colour jitter, spec 3), its losses with the batch's
image ids (``batch_losses``: classification, contrast with region mix-up, then the memory write and the online
accumulation of the refined maps, keyed by image id), its optimiser (Nesterov SGD, the 1x / 2x / 10x / 20x
groups, x0.1 at epochs 5 and 10, spec 7). RCA's CAMs are the maps accumulated *during* training (spec 8), so
its steps replace ``make_cam`` by ``make_rca_cam``, which writes them into the standard CAM files; ``eval_cam``
and any refiner then run unchanged:

- ``--refiner saliency`` (``methods.saliency``): the paper's pseudo masks, the maps fused with saliency maps
  and a dense CRF (spec 9). Image labels + saliency (I+S) supervision.
- ``--refiner irn`` (or ``affinitynet``): a saliency-free variant (spec 13, proposed), not the paper's
  setting; the metrics rows say so (``tags``).

CDA (``--cda true``) works with RCA and IRN: train_cam hands the composites after their originals, the memory
and the contrast take both, and only the originals' maps are accumulated (a composite is not the image its id
names). (The saliency refiner refuses CDA: see ``methods.saliency``.)

Defaults are the reference's (spec 12). ``presets``: on VOC its recipe (VGG-16 at output stride 8, 368 px,
batch 8, 30 epochs, heads 512 wide); on the demo / photos a CPU size (the demo's backbone at its output
stride 16, 128 / 224 px, heads 32 wide, batch 8, 6 epochs so that the contrast from epoch 2 and the first
learning-rate drop at epoch 5 happen). Choices and deviations, each with its reason:

- Fixed: maps keyed by image id, so the loader shuffles (spec 10 #1); the memory write and the contrast mask
  the original features for every class (spec 5.5); under DDP the writes and the maps of every rank are
  all-gathered and applied in rank order on all ranks, and rank 0's centroids are broadcast (spec 10 #2).
- Reproduced: the EMA slot update (``--rca_memory_update``), memory of backbone features queried with
  embeddings (``--rca_memory_feature``), the unnormalised aggregation (``--rca_agg_softmax``), the aggregation
  layers in the 1x group, the contrast scale ``B / 4`` of the 4-GPU run (``--rca_contrast_scale``).
- The contrast term is part of the graph from the first step, weighted 0 before epoch 2 (the reference
  leaves it out): every parameter then takes part in every backward, which DDP needs; the price is that the
  embedding head's weights feel weight decay during epochs 0-1.
- k-means is ours in torch (scikit-learn's defaults of the time: k-means++, 10 runs, 300 iterations),
  seeded by the run's seed and the epoch.
- Other backbones run at ``--rca_output_stride`` (by dilation) and read ``tap(4)``, whose channels are the
  memory's dimension; the heads' hidden width is ``--rca_head_width``, and off the paper's widths the heads'
  initial standard deviation scales to keep the paper's per-layer gain (``net.rca``).
- The pipeline's loader drops the last partial batch of each (shuffled) epoch: an image left out of the last
  epoch whose class never reached the accumulation threshold keeps no map (``make_rca_cam`` warns; on VOC at
  most 6 images of 10,582).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torch import nn

from dataset.base import DatasetInfo, read_id_list
from dataset.labels import load_cls_labels
from dataset.samples import ClassificationDataset
from methods.base import CAMMethod
from misc import dist
from misc.cam_store import normalise, strided_size
from misc.checkpoint import unwrap
from misc.errors import UserError
from misc.flags import str2bool
from misc.imutils import hwc_to_chw, normalize
from misc.optim import StepSGD
from misc.train import Stage
from misc.weights import resolve_weights
from net.backbone import read_checkpoint
from net.factory import build_backbone
from net.rca import (
    MEMORY_FEATURES,
    MEMORY_UPDATES,
    AccumulatedMaps,
    RCAConfig,
    RCANet,
    contrast_loss,
    masked_means,
    region_masks,
)

log = logging.getLogger("wsss")

# Backbones with a single layout, output stride 8 (VGG-16 as RCA modifies it, ResNet-38 as PSA's).
STRIDE_8_ONLY = ("vgg16", "resnet38")
# The reference's learning-rate multipliers (spec 7): the ``extra`` heads 10x, biases 2x (so head biases 20x).
HEAD_LR, BIAS_LR = 10, 2
# ColorJitter(brightness 0.3, contrast 0.3, saturation 0.3, hue 0.1) of the reference's transform (spec 3).
JITTER = (0.3, 0.3, 0.3, 0.1)


def color_jitter(img: np.ndarray, rng: np.random.Generator, jitter: Sequence[float] = JITTER) -> np.ndarray:
    """torchvision's ``ColorJitter`` on a uint8 ``(H, W, 3)`` image, drawn from ``rng``: brightness, contrast and
    saturation factors ~ U[1 - j, 1 + j] and a hue shift ~ U[-j, j] of a turn, applied in random order (PIL's
    enhancers and an HSV hue shift, as torchvision does on PIL images)."""
    brightness, contrast, saturation, hue = jitter
    pil = Image.fromarray(img)
    for op in rng.permutation(4).tolist():
        if op == 0:
            pil = ImageEnhance.Brightness(pil).enhance(rng.uniform(1 - brightness, 1 + brightness))
        elif op == 1:
            pil = ImageEnhance.Contrast(pil).enhance(rng.uniform(1 - contrast, 1 + contrast))
        elif op == 2:
            pil = ImageEnhance.Color(pil).enhance(rng.uniform(1 - saturation, 1 + saturation))
        else:
            hsv = np.asarray(pil.convert("HSV")).copy()
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(rng.uniform(-hue, hue) * 255)) % 256
            pil = Image.fromarray(hsv, "HSV").convert("RGB")
    return np.asarray(pil)


class SquareResizeDataset(ClassificationDataset):
    """RCA's classifier images (spec 3): resized to ``size x size`` (bilinear; the aspect ratio is not kept),
    colour-jittered when ``augment``, normalised; no flip, crop or scale, so the network's grid covers the whole
    image and the accumulated maps resize straight back to it. Items as ``ClassificationDataset``'s."""

    def __init__(self, info: DatasetInfo, ids: Sequence[str], labels: dict[str, np.ndarray], *, size: int,
                 augment: bool, seed: int) -> None:
        super().__init__(info, ids, labels, crop_size=size, augment=augment, seed=seed)
        self.size = size

    def transform(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        img = np.asarray(Image.fromarray(img).resize((self.size, self.size), Image.Resampling.BILINEAR))
        if self.augment:
            img = color_jitter(img, rng)
        return hwc_to_chw(normalize(img))


def label_matrix(ids: Sequence[str], labels: dict[str, np.ndarray], num_classes: int) -> torch.Tensor:
    """Multi-hot ``(N, C)`` of ``ids``; ``UserError`` naming an id without a label."""
    missing = [i for i in ids if i not in labels]
    if missing:
        raise UserError(f"{len(missing)} training ids have no image-level label (first: {missing[0]}): re-run "
                        "make_cls_labels.")
    return torch.from_numpy(np.stack([np.asarray(labels[i], np.float32) for i in ids]).reshape(-1, num_classes))


def config_from_args(args: argparse.Namespace) -> RCAConfig:
    """The network's hyperparameters from the flags (the rest are the reference's, ``RCAConfig``)."""
    scale = args.rca_contrast_scale if args.rca_contrast_scale is not None else args.cam_batch_size / 4
    return RCAConfig(head_width=args.rca_head_width, queue_length=args.rca_queue_length, centroids=args.rca_centroids,
                     enqueue_threshold=args.rca_enqueue_threshold, accumulate_threshold=args.rca_accumulate_threshold,
                     memory_update=args.rca_memory_update, memory_feature=args.rca_memory_feature,
                     contrast_weight=args.rca_contrast_weight, contrast_scale=scale, agg_softmax=args.rca_agg_softmax,
                     seed=args.seed)


class RCA(CAMMethod):
    """``--cam_method rca`` (see the module docstring)."""

    name = "rca"
    steps = (("train_cam", "train_cam"), ("make_cam", "make_rca_cam"), ("eval_cam", "eval_cam"))
    settings = ("rca_input_size", "rca_output_stride", "rca_head_width", "rca_learning_rate", "rca_weight_decay",
                "rca_momentum", "rca_lr_decay_epochs", "rca_queue_length", "rca_centroids", "rca_enqueue_threshold",
                "rca_accumulate_threshold", "rca_memory_update", "rca_memory_feature", "rca_contrast_weight",
                "rca_contrast_scale", "rca_agg_softmax")
    presets: ClassVar[dict[str, dict[str, object]]] = {
        # The reference's recipe (spec 12): VGG-16 at output stride 8, 368 px, batch 8, 30 epochs.
        "voc": {"backbone": "vgg16", "backbone_weights": "vgg16_imagenet", "cam_batch_size": 8,
                "cam_num_epoches": 30, "rca_input_size": 368, "rca_output_stride": 8, "rca_head_width": 512},
        # A CPU-sized run on the demo's backbone: its crop size at its usual output stride 16 (the dilated
        # stride 8 costs ~5x on a CPU), heads 1/16 as wide; 6 epochs, so that the contrast (from epoch 2) and
        # the first learning-rate drop (epoch 5) happen.
        "demo": {"cam_batch_size": 8, "cam_num_epoches": 6, "rca_input_size": 128, "rca_output_stride": 16,
                 "rca_head_width": 32},
        "photos": {"cam_batch_size": 8, "cam_num_epoches": 6, "rca_input_size": 224, "rca_output_stride": 16,
                   "rca_head_width": 32},
    }

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("RCA (--cam_method rca, rca spec; batch and epochs: --cam_batch_size, "
                                      "--cam_num_epoches)")
        g.add_argument("--rca_input_size", type=int, default=None,
                       help="square training size, a multiple of the output stride (voc: 368; the maps are "
                            "1/stride of it)")
        g.add_argument("--rca_output_stride", type=int, choices=[8, 16], default=None,
                       help="the backbone's output stride, by dilation (voc: 8, the paper's; vgg16 and resnet38 "
                            "have 8 only)")
        g.add_argument("--rca_head_width", type=int, default=None, help="the heads' hidden width (voc: 512)")
        g.add_argument("--rca_learning_rate", type=float, default=1e-3,
                       help="base learning rate; heads 10x (biases: 2x / 20x)")
        g.add_argument("--rca_weight_decay", type=float, default=5e-4)
        g.add_argument("--rca_momentum", type=float, default=0.9, help="Nesterov momentum")
        g.add_argument("--rca_lr_decay_epochs", type=int, nargs="*", default=[5, 10],
                       help="epochs at whose start the learning rates drop 10x")
        g.add_argument("--rca_queue_length", type=int, default=500, help="memory entries per class")
        g.add_argument("--rca_centroids", type=int, default=10, help="k-means centroids per class")
        g.add_argument("--rca_enqueue_threshold", type=float, default=0.7,
                       help="a labelled class enters the memory when its probability exceeds this")
        g.add_argument("--rca_accumulate_threshold", type=float, default=0.1,
                       help="an epoch's map counts for the accumulated map when its class's probability reaches this")
        g.add_argument("--rca_memory_update", choices=MEMORY_UPDATES, default="ema",
                       help="ema: slot = 0.99 slot + 0.01 new (the reference's); replace: a FIFO queue")
        g.add_argument("--rca_memory_feature", choices=MEMORY_FEATURES, default="backbone",
                       help="what the memory stores: backbone features (the reference's) or the contrast's "
                            "embeddings")
        g.add_argument("--rca_contrast_weight", type=float, default=0.01, help="of the contrast loss, from epoch 2")
        g.add_argument("--rca_contrast_scale", type=float, default=None,
                       help="the contrast's per-image mean times this (default batch / 4: the reference's sum "
                            "over 2 images per GPU averaged over 4 GPUs)")
        g.add_argument("--rca_agg_softmax", type=str2bool, default=False,
                       help="softmax-normalised aggregation attention (the reference's is unnormalised)")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> str | None:
        if args.rca_output_stride is None or (args.backbone in STRIDE_8_ONLY and args.rca_output_stride != 8):
            return (f"--rca_output_stride must be 8 for {args.backbone} (8 or 16 for other backbones), got "
                    f"{args.rca_output_stride}")
        stride = args.rca_output_stride
        if args.rca_input_size is None or args.rca_input_size < stride or args.rca_input_size % stride:
            return f"--rca_input_size must be a multiple of --rca_output_stride {stride}, got {args.rca_input_size}"
        if args.rca_head_width is None or args.rca_head_width < 1:
            return f"--rca_head_width must be >= 1, got {args.rca_head_width}"
        if args.cam_num_epoches < 2:
            return (f"--cam_num_epoches {args.cam_num_epoches}: RCA accumulates its maps from epoch 1 on, so it "
                    "needs at least 2 epochs")
        if args.rca_centroids < 1 or args.rca_queue_length < max(args.rca_centroids, args.cam_batch_size):
            return (f"--rca_queue_length ({args.rca_queue_length}) must hold at least --rca_centroids "
                    f"({args.rca_centroids}, >= 1) and one batch's writes (--cam_batch_size {args.cam_batch_size})")
        if not (0 <= args.rca_enqueue_threshold < 1 and 0 <= args.rca_accumulate_threshold < 1):
            return "--rca_enqueue_threshold and --rca_accumulate_threshold must lie in [0, 1)"
        if args.rca_learning_rate <= 0 or args.rca_weight_decay < 0 or not 0 <= args.rca_momentum < 1:
            return "--rca_learning_rate must be > 0, --rca_weight_decay >= 0 and --rca_momentum in [0, 1)"
        if args.rca_contrast_weight < 0 or (args.rca_contrast_scale is not None and args.rca_contrast_scale < 0):
            return "--rca_contrast_weight and --rca_contrast_scale must be >= 0"
        return None

    @classmethod
    def tags(cls, args: argparse.Namespace) -> dict[str, str]:
        extras = ", softmax aggregation" if args.rca_agg_softmax else ""
        tags = {"cams": f"RCA maps accumulated during training (memory update {args.rca_memory_update}, "
                        f"{args.rca_memory_feature} features{extras})"}
        if args.refiner != "saliency":
            tags["pseudo_masks"] = (f"saliency-free: RCA maps refined by {args.refiner} (not the paper's image + "
                                    "saliency setting)")
        return tags

    def build(self, args: argparse.Namespace, num_classes: int) -> RCANet:
        ids = read_id_list(args.train_list)
        labels = label_matrix(ids, load_cls_labels(args.cls_labels, num_classes), num_classes)
        backbone = build_backbone(args.backbone, resolve_weights(args.backbone_weights), dilate=True,
                                  output_stride=args.rca_output_stride)
        grid = args.rca_input_size // backbone.strides[4]
        config = config_from_args(args)
        log.info("rca: %s backbone, memory update %s of %s features, contrast scale %g, %s aggregation",
                 args.backbone, config.memory_update, config.memory_feature, config.contrast_scale,
                 "softmax" if config.agg_softmax else "unnormalised")
        return RCANet(backbone, num_classes, config, ids, labels, (grid, grid))

    def stages(self, args: argparse.Namespace, steps_per_epoch: int,
               poly_length: Callable[[int], int]) -> list[Stage]:
        # A step schedule by epochs (spec 7): CDA's poly-length quirk does not apply.
        milestones = [e * steps_per_epoch for e in args.rca_lr_decay_epochs]

        def make(model: nn.Module) -> StepSGD:
            lr = args.rca_learning_rate
            rates = (lr, BIAS_LR * lr, HEAD_LR * lr, HEAD_LR * BIAS_LR * lr)
            groups = [{"params": p, "lr": rate} for p, rate in zip(model.param_groups(), rates, strict=True)]
            return StepSGD(groups, lr=lr, weight_decay=args.rca_weight_decay, momentum=args.rca_momentum,
                           milestones=milestones)

        def prepare(model: nn.Module) -> None:
            model.set_schedule(steps_per_epoch, args.cam_num_epoches)

        return [Stage(steps_per_epoch * args.cam_num_epoches, make, prepare)]

    def classification_set(self, args: argparse.Namespace, info: DatasetInfo, ids: list[str],
                           labels: dict[str, np.ndarray], augment: bool) -> SquareResizeDataset:
        return SquareResizeDataset(info, ids, labels, size=args.rca_input_size, augment=augment, seed=args.seed)

    def batch_losses(self, net: nn.Module, batch: dict, imgs: torch.Tensor,
                     labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.losses(net, imgs, labels, ids=batch["name"])

    def losses(self, net: nn.Module, imgs: torch.Tensor, labels: torch.Tensor,
               ids: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """One training step's losses (spec 6), then the step's memory write and accumulation (spec 5.3, 8).

        ``imgs (B, 3, S, S)``, ``labels (B, C)``; ``ids``: the ids of the first ``len(ids)`` images, whose maps
        are accumulated (None: none are). Returns ``{"loss", "cls", "sc"}`` (``sc`` scaled, counted in the loss
        from epoch 2 on). ``net`` may be DDP-wrapped; at the first step of an epoch >= 1 the centroids are
        re-clustered first (spec 5.4).
        """
        model = unwrap(net)
        cfg = model.config
        epoch = model.epoch
        if epoch >= 1 and int(model.memory.centroid_epoch) != epoch:
            report_memory(model, epoch)
            model.memory.refresh_centroids(epoch, cfg.seed)
        out = net(imgs, maps=True)
        with torch.autocast(imgs.device.type, enabled=False):
            y = labels.float()
            coarse, refined = out["coarse"].float(), out["refined"].float()
            logits = refined.mean((2, 3))
            cls = F.multilabel_soft_margin_loss(logits, y) + \
                cfg.coarse_weight * F.multilabel_soft_margin_loss(coarse.mean((2, 3)), y)
            masks = region_masks(coarse)
            sc = cfg.contrast_scale * contrast_loss(out["embed"], masks, y, model.memory.keys(), cfg.tau,
                                                    cfg.mixup_beta)
            weight = cfg.contrast_weight if epoch >= cfg.contrast_from_epoch else 0.0
            update_state(model, out, masks, logits, y, ids)
        model.steps_done += 1
        return {"loss": cls + weight * sc, "cls": cls, "sc": sc}

    def cams(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``ReLU(M_r) (B, C, h, w)``, through the trained centroids (a post-hoc inference
        pass; RCA's own CAMs are the accumulated maps, ``make_rca_cam``)."""
        return F.relu(model.refined_maps(model.features(x)))


def report_memory(model: RCANet, epoch: int) -> None:
    """Before epoch ``epoch``'s clustering: how many region features the memory has received, and a warning
    naming the labelled classes still without one (their centroids stay random, and the aggregation feeds
    that noise to the refined head)."""
    if not dist.is_main():
        return
    writes = model.memory.writes.cpu()
    labelled = model.accumulated.pairs[:, 1].unique().cpu()
    empty = [int(c) for c in labelled if writes[c] == 0]
    log.info("rca: epoch %d: %d memory writes so far, %d of %d labelled classes written", epoch, int(writes.sum()),
             len(labelled) - len(empty), len(labelled))
    if empty:
        log.warning("rca: %d labelled classes have no memory entry yet (0-based indices %s): no image of theirs "
                    "reached --rca_enqueue_threshold %g, so their centroids are the random initial entries (an "
                    "under-trained classifier: train longer or at a larger --rca_learning_rate)", len(empty),
                    ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else ""),
                    model.config.enqueue_threshold)


@torch.no_grad()
def update_state(model: RCANet, out: dict[str, torch.Tensor], masks: torch.Tensor, logits: torch.Tensor,
                 labels: torch.Tensor, ids: Sequence[str] | None) -> None:
    """After a step's forward: the memory write (spec 5.3) and, from epoch 1, the accumulation (spec 8).

    ``out``: the network's training outputs, ``masks (B, C, h, w)`` the regions, ``logits (B, C)``, ``labels
    (B, C)``, ``ids`` of the leading images whose maps are kept. Every rank gathers all ranks' writes and
    maps and applies them in rank order, so the buffers stay identical under DDP.
    """
    cfg = model.config
    probs = logits.sigmoid()
    source = out["features"] if cfg.memory_feature == "backbone" else out["embed"]
    embeddings = masked_means(source.detach().float(), masks)
    image, cls = ((labels > 0.5) & (probs > cfg.enqueue_threshold)).nonzero(as_tuple=True)
    model.memory.write(dist.all_gather_rows(cls), dist.all_gather_rows(embeddings[image, cls]), cfg.memory_momentum,
                       cfg.memory_update)
    epoch = model.epoch
    if ids is None or epoch < 1:
        return
    rows = model.accumulated.rows_of(ids).to(logits.device)
    image, cls = (rows >= 0).nonzero(as_tuple=True)
    model.accumulated.update(dist.all_gather_rows(rows[image, cls]),
                             dist.all_gather_rows(out["refined"][image, cls].detach().float()),
                             dist.all_gather_rows(probs[image, cls]), epoch, model.epochs - 1,
                             cfg.accumulate_threshold)


# ---------------------------------------------------------------------------------------------- export


def load_accumulated(args: argparse.Namespace, weights: str, num_classes: int) -> AccumulatedMaps:
    """The accumulated maps of the RCA weights ``weights`` (a path or registry name) for this round's training
    list; ``UserError`` if the file holds none or holds those of another list or labels."""
    path = resolve_weights(weights)
    state = read_checkpoint(path)
    prefix = "accumulated."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if set(own) != {"pairs", "maps", "stored"}:
        raise UserError(f"{path} holds no accumulated maps: it is not the weights of an RCA network "
                        "(--cam_method rca trains them).")
    ids = read_id_list(args.train_list)
    store = AccumulatedMaps(ids, label_matrix(ids, load_cls_labels(args.cls_labels, num_classes), num_classes),
                            tuple(own["maps"].shape[1:]))
    if not torch.equal(own["pairs"], store.pairs):
        raise UserError(f"the maps in {path} were accumulated for another training list or other labels than "
                        f"{args.train_list}: retrain (--train_cam_pass true) or pass that run's list.")
    store.load_state_dict(own)
    missing = int((~store.stored).sum())
    if missing:
        log.warning("make_rca_cam: %d of %d (image, class) maps were never accumulated (zero maps)", missing,
                    len(store.stored))
    return store


def export_maps(maps: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's accumulated maps ``(k, h, w)`` -> its CAM file's ``(cam (k, H4, W4), high_res (k, H, W))``:
    bilinear to the stride-4 and the full size of the image (the maps cover the whole image: spec 8), each
    class divided by its max (``misc.cam_store.normalise``)."""
    h, w = size
    if not len(maps):
        return maps.new_zeros((0, *strided_size(h, w))), maps.new_zeros((0, h, w))
    x = maps.float()[None]
    cam = F.interpolate(x, strided_size(h, w), mode="bilinear", align_corners=False)[0]
    high_res = F.interpolate(x, (h, w), mode="bilinear", align_corners=False)[0]
    return normalise(cam), normalise(high_res)

