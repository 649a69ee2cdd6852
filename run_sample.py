"""Run the WSSS pipeline: CAM method -> (CDA) -> refiner pseudo masks -> segmenter, one step module at a time.

    python run_sample.py                                     # embedded demo dataset, CPU-sized preset
    python run_sample.py --voc12_root ~/data/VOCdevkit/VOC2012   # PASCAL VOC, IRNet defaults
    python run_sample.py --dataset coco14 --data_root ~/data/coco   # COCO 2014 in the WSSS layout
    torchrun --nproc_per_node=4 run_sample.py --voc12_root ...    # the same on 4 GPUs (DDP)
    python run_sample.py --config work_dir/config.yaml          # again, from a run's resolved settings

Every step reads its inputs from and writes its outputs to ``--work_dir``; ``--<step>_pass false``
skips a step, and re-running resumes per image where a step was interrupted. The run's resolved settings
are written to ``<work_dir>/config.yaml``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import yaml
from tqdm import tqdm

import dataset
import methods
from dataset.base import read_id_list
from methods.irn import TRAIN_RADIUS
from methods.saliency import MODELS as SALIENCY_MODELS
from methods.vit import vit_weights
from misc import dist
from misc.curriculum import schedule_flag
from misc.errors import UserError, user_message
from misc.flags import out_of_bounds, str2bool
from misc.io import IN_PROGRESS, atomic_write, latest_metrics
from misc.metrics import headline, seed_details
from misc.thresholds import REFERENCE, WALKED
from misc.weights import resolve_weights
from net.backbone import read_checkpoint
from net.factory import BACKBONE_NAMES
from net.vit import read_vit_checkpoint

log = logging.getLogger("wsss")

PROJECT_DIR = Path(__file__).resolve().parent

# Preset values fill every flag the user did not give. "voc" is IRNet/CDA's published configuration
# (spec section 12); "demo" is sized so the whole pipeline runs in minutes on a 2-core CPU; "photos" is the
# demo's networks set up for real photos of a few hundred pixels on such a machine.
PRESETS: dict[str, dict[str, object]] = {
    "voc": dict(
        backbone="resnet50",
        backbone_weights="resnet50_imagenet_legacy",
        cam_batch_size=16,
        cam_num_epoches=5,
        cam_crop_size=512,
        cam_resize_long=(320, 640),
        cam_scales=(1.0, 0.5, 1.5, 2.0),
        irn_crop_size=512,
        irn_batch_size=32,
        irn_num_epoches=3,
        exp_times=8,
        # AffinityNet (--refiner affinitynet): PSA's crop, batch and epochs; SEAM's learning rate (PSA's
        # README value 0.1 is for VGG-16, spec 3.2); PSA's 2^8 walk steps.
        aff_crop_size=448,
        aff_batch_size=8,
        aff_num_epoches=8,
        aff_learning_rate=0.01,
        aff_logt=8,
        rw_normalize=False,
        calibrate_thresholds=False,
        deeplab_arch="v2",
        deeplab_backbone="resnet101",
        deeplab_weights="resnet101_imagenet_legacy",
        deeplab_output_stride=8,  # DeepLab-v2's ASPP rates 6-24 were chosen for output stride 8
        deeplab_crop_size=321,
        deeplab_batch_size=10,
        deeplab_iters=20000,
        deeplab_learning_rate=2.5e-4,
        deeplab_eval_scales=(0.5, 0.75, 1.0, 1.25, 1.5),
        deeplab_ckpt_every=1000,
        deeplab_weight_decay=5e-4,
        deeplab_ignore_uncertain=False,
        orandnet_iters=5000,  # ORANDNet's FCN (--cam_method orand): the reference's iterations and network
        orandnet_width=1.0,
    ),
    "demo": dict(
        backbone="efficientnet_lite0",
        backbone_weights="efficientnet_lite0_imagenet",
        cam_batch_size=16,
        cam_num_epoches=5,
        cam_crop_size=128,
        cam_resize_long=(112, 176),
        cam_scales=(1.0, 0.5, 1.5),
        irn_crop_size=128,
        irn_batch_size=16,
        irn_num_epoches=6,  # 75 optimiser steps for IRN's from-scratch branches (3 epochs: 37)
        # The walk's reach grows with sqrt(steps): 2^8 steps on VOC's ~94x125 grid cover as much of the image
        # as 2^5 on the demo's ~40x45 grid (grid area ratio ~1/6.5, 2^(8 - 2.7)).
        exp_times=5,
        aff_crop_size=128,
        aff_batch_size=16,
        aff_num_epoches=6,
        aff_learning_rate=0.01,
        aff_logt=5,  # PSA's 2^8 on VOC's ~47x63 stride-8 grid, scaled to the demo's ~20x23 as exp_times is
        # EfficientNet-Lite0's demo CAMs spill onto the context (best threshold ~0.55, not VOC's 0.15):
        # thresholds follow the CAMs (misc.thresholds) and the walk keeps CAM units (propagate).
        rw_normalize=True,
        calibrate_thresholds=True,
        deeplab_arch="v3+",
        deeplab_backbone="efficientnet_lite0",
        deeplab_weights="efficientnet_lite0_imagenet",
        deeplab_output_stride=16,
        deeplab_crop_size=128,
        deeplab_batch_size=8,
        deeplab_iters=200,
        # 0.01 saturates EfficientNet-Lite0's ReLU6 head conv within 200 steps (every feature 0 or 6).
        deeplab_learning_rate=0.001,
        deeplab_eval_scales=(1.0, 0.75, 1.25),
        deeplab_ckpt_every=100,
        deeplab_weight_decay=5e-4,
        # The masks' background holds every object part the walk left below the threshold; learning those
        # as background shrank DeepLab's objects far below the masks' (step.train_deeplab.label_dir).
        deeplab_ignore_uncertain=True,
        # ORANDNet's FCN-8s at 1/8 of VGG-16's widths: its 134M parameters (fc6 alone 103M) are no CPU demo.
        orandnet_iters=300,
        orandnet_width=0.125,
    ),
}
# Real photos on a small machine: the demo's networks, trained longer, the CAMs at the photos' own scale.
# Measured on voc12_photos (450 train photos at 256 px, seed 0; docs/benchmarks.md, "Real photos"): CAM mIoU at the best
# threshold 20.3 with the demo's 5 epochs at 128 px crops, 23.3 with 15 epochs, 21.3 with 224 px crops, 24.3
# with both (the classifier's held-out loss 0.088 -> 0.069).
PRESETS["photos"] = {
    **PRESETS["demo"],
    "cam_num_epoches": 15,
    "cam_crop_size": 224,
    "cam_resize_long": (192, 320),
    # DeepLab trained on the photos' ground truth: 15.8 val mIoU at the demo's 200 iterations, 25.8 at 800; on
    # the pseudo masks 16.5 -> 20.7 (seed 0).
    "deeplab_iters": 800,
    "deeplab_ckpt_every": 200,
}

# What ``--eval_released`` evaluates: CDA's released weights of each method it was published on (its README;
# irnet_cda spec 13, seam_affinitynet spec 5), with the inference settings of that method's reference. The
# ResNet-38 files hold whole networks, so no ImageNet backbone is loaded first.
RELEASED: dict[str, dict[str, object]] = {
    "irn": {"cam_weights": "cda_irnet_resnet50_cam", "irn_weights": "cda_irnet_resnet50_irn"},
    "psa": {"backbone": "resnet38", "backbone_weights": None, "cam_method": "cam", "refiner": "affinitynet",
            "cam_weights": "cda_resnet38_psa_cam", "affinity_weights": "cda_resnet38_psa_aff",
            "cam_scales": (1.0, 0.5, 1.5, 2.0), "aff_rw_alpha": 16.0, "aff_beta": 8.0, "aff_logt": 8},
    "seam": {"backbone": "resnet38", "backbone_weights": None, "cam_method": "seam", "refiner": "affinitynet",
             "cam_weights": "cda_resnet38_seam_cam", "affinity_weights": "cda_resnet38_seam_aff",
             "cam_scales": (0.5, 1.0, 1.5, 2.0), "aff_rw_alpha": 6.0, "aff_beta": 8.0, "aff_logt": 6},
}


def _released_method(value: str) -> str | None:
    """``--eval_released``: a method of ``RELEASED``, ``true`` (IRNet's, as before) or ``false``."""
    lowered = value.lower()
    if lowered in RELEASED:
        return lowered
    if lowered in ("false", "no", "0", "none"):
        return None
    if lowered in ("true", "yes", "1"):
        return "irn"
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(RELEASED)}, true or false, got {value!r}")


# Every step any plug-in brings gets a ``--<flag>_pass`` switch; the chosen plug-ins decide which run.
PLUGINS = [*methods.CAM_METHODS.values(), *methods.REFINERS.values(), *methods.SEGMENTERS.values()]
# What a run learns from: tags (the CAM rounds) or the sparse labels some segmenter reads itself.
SUPERVISIONS = tuple(dict.fromkeys(s for segmenter in methods.SEGMENTERS.values() for s in segmenter.supervisions))
STEP_PASSES = list(dict.fromkeys(flag for plugin in PLUGINS for flag, _ in plugin.steps)) + ["make_aug_fg", "report"]
# Flags whose resolved value is derived from the work dir or the dataset; config.yaml keeps them as given so
# that it can be re-run in another work dir or on another machine.
DERIVED = ("data_root", "train_list", "val_list", "infer_list", "eval_list", "test_list", "deeplab_train_list",
           "ins_seg_list", "cls_labels")


class _Parser(argparse.ArgumentParser):
    """Flag errors are user errors: one line naming the flag, exit code 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (python run_sample.py --help lists the flags)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("environment")
    g.add_argument("--config", default=None, help="a run's config.yaml: its settings become the defaults")
    g.add_argument("--dataset", choices=sorted(dataset.DATASETS), default=None, help="default: voc12")
    g.add_argument("--data_root", default=None,
                   help="the dataset's root folder; default: the demo dataset (voc12, or coco14 in COCO layout)")
    g.add_argument("--voc12_root", dest="data_root", help="VOC2012 root (with JPEGImages/): --dataset voc12 "
                   "--data_root ROOT")
    g.add_argument("--work_dir", default="work_dir", help="every output goes under this folder")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="default: demo without --voc12_root, voc with it; photos: real photos on a small machine (CPU)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--num_workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--amp", type=str2bool, default=True, help="mixed precision on CUDA (ignored on CPU)")
    g.add_argument("--max_image_side", type=int, default=2048,
                   help="photos (and their masks) with a longer side are scaled down to it when read, by every "
                        "step: a memory bound for huge photos (VOC, COCO and Cityscapes are within it)")
    g.add_argument("--demo_size", type=int, nargs=3, default=(200, 80, 80), metavar=("TRAIN_AUG", "TRAIN", "VAL"))
    g.add_argument(
        "--demo_context_bias",
        type=float,
        default=0.85,
        help="fraction of a demo class's images on its typical background (the bias CDA addresses)",
    )

    g = p.add_argument_group("dataset lists (default: the dataset's own lists, else shipped or scanned ones)")
    for name in ("train_list", "val_list", "infer_list", "eval_list", "test_list"):
        g.add_argument(f"--{name}", default=None)
    g.add_argument("--ins_seg_list", default=None, help="ids for instance pseudo labels (default: eval_list)")
    g.add_argument("--cls_labels", default=None, help="labels TSV cache (default: <work_dir>/cls_labels.tsv)")

    g = p.add_argument_group("methods (plug-ins, see methods/)")
    g.add_argument("--cam_method", choices=sorted(methods.CAM_METHODS), default="cam")
    g.add_argument("--refiner", choices=sorted(methods.REFINERS), default="irn")
    g.add_argument("--segmenter", choices=sorted(methods.SEGMENTERS), default="deeplab")
    g.add_argument("--supervision", choices=SUPERVISIONS, default="tags",
                   help="tags: image-level labels through the CAM rounds; points / scribbles: sparse labels the "
                        "segmenter learns from directly (--segmenter agmm), the CAM rounds skipped")

    g = p.add_argument_group("networks")
    g.add_argument("--backbone", choices=BACKBONE_NAMES, default=None)
    g.add_argument("--backbone_weights", default=None, help="checkpoint path, registry name, or none")
    g.add_argument("--cam_weights", default=None, help="evaluate these CAM weights instead of training")
    g.add_argument("--irn_weights", default=None, help="use these IRN weights instead of training")
    g.add_argument(
        "--eval_released",
        type=_released_method,
        default=None,
        help="download CDA's released weights of one method and run make_cam -> eval -> pseudo masks -> eval: "
             f"{', '.join(RELEASED)} ('true' = irn)",
    )

    g = p.add_argument_group("CAM (spec 3-5)")
    g.add_argument("--cam_batch_size", type=int, default=None)
    g.add_argument("--cam_num_epoches", type=int, default=None)
    g.add_argument("--cam_learning_rate", type=float, default=0.1)
    g.add_argument("--cam_weight_decay", type=float, default=1e-4)
    g.add_argument(
        "--cam_momentum",
        type=float,
        default=None,
        help="SGD momentum; default reproduces the reference (momentum = weight decay, i.e. plain SGD)",
    )
    g.add_argument("--cam_crop_size", type=int, default=None)
    g.add_argument("--cam_resize_long", type=int, nargs=2, default=None)
    g.add_argument("--cam_eval_thres", type=float, default=0.15)
    g.add_argument("--cam_eval_sweep", type=float, nargs="*", default=None, help="thresholds (default 0.05..0.95)")
    g.add_argument("--cam_scales", type=float, nargs="+", default=None)
    g.add_argument("--cam_max_side", type=int, default=1280,
                   help="make_cam scales a photo down so its largest scale's long side stays within this "
                        "(a memory bound for huge photos; VOC and COCO at 2.0x stay below it)")

    g = p.add_argument_group("IRN and pseudo labels (spec 6-9)")
    thres_help = "default: the reference's {:.2f}, or calibrated with --calibrate_thresholds"
    g.add_argument(
        "--calibrate_thresholds",
        type=str2bool,
        default=None,
        help="derive the seed and pseudo-mask thresholds from eval_cam's best threshold (misc.thresholds; uses "
        "the eval split's ground truth); thresholds given explicitly are kept",
    )
    g.add_argument("--conf_fg_thres", type=float, default=None, help=thres_help.format(REFERENCE["conf_fg_thres"]))
    g.add_argument("--conf_bg_thres", type=float, default=None, help=thres_help.format(REFERENCE["conf_bg_thres"]))
    g.add_argument("--irn_crop_size", type=int, default=None)
    g.add_argument("--irn_batch_size", type=int, default=None)
    g.add_argument("--irn_num_epoches", type=int, default=None)
    g.add_argument("--irn_learning_rate", type=float, default=0.1)
    g.add_argument("--irn_weight_decay", type=float, default=1e-4)
    g.add_argument("--irn_momentum", type=float, default=None, help="as --cam_momentum")
    g.add_argument("--beta", type=float, default=10)
    g.add_argument("--exp_times", type=int, default=None, help="the walk takes 2^exp_times steps")
    g.add_argument(
        "--rw_normalize",
        type=str2bool,
        default=None,
        help="divide the walked CAMs by the walked boundary mass (CAM units) instead of by their global max",
    )
    for name in WALKED:
        g.add_argument(f"--{name}", type=float, default=None, help=thres_help.format(REFERENCE[name]))

    g = p.add_argument_group("Context Decoupling Augmentation (spec 10)")
    g.add_argument("--cda", type=str2bool, default=True, help="run the CDA round after the baseline round")
    g.add_argument("--cda_min_ratio", type=float, default=0.1)
    g.add_argument("--cda_max_ratio", type=float, default=0.7)
    g.add_argument("--cda_max_size", type=float, default=0.7)
    g.add_argument("--cda_max_angle", type=int, default=90)
    g.add_argument(
        "--cda_mask_order",
        type=int,
        choices=[0, 3],
        default=0,
        help="mask rotation interpolation: 0 nearest (fixed), 3 cubic (reference; dilates the mask)",
    )
    g.add_argument(
        "--cda_schedule",
        choices=["reference", "actual"],
        default="reference",
        help="poly LR length: 'reference' sizes it for the full batch, so it ends half-way (spec 10.4)",
    )

    g = p.add_argument_group("DeepLab (spec 11)")
    g.add_argument("--deeplab_arch", choices=["v2", "v3+"], default=None)
    g.add_argument("--deeplab_backbone", choices=BACKBONE_NAMES, default=None)
    g.add_argument("--deeplab_weights", default=None)
    g.add_argument("--deeplab_train_list", default=None, help="ids DeepLab trains on (default: --train_list)")
    g.add_argument("--deeplab_output_stride", type=int, choices=[8, 16], default=None)
    g.add_argument("--deeplab_crop_size", type=int, default=None)
    g.add_argument("--deeplab_batch_size", type=int, default=None)
    g.add_argument("--deeplab_iters", type=int, default=None)
    g.add_argument("--deeplab_learning_rate", type=float, default=None)
    g.add_argument("--deeplab_weight_decay", type=float, default=None)
    g.add_argument("--deeplab_eval_scales", type=float, nargs="+", default=None)
    g.add_argument("--deeplab_ckpt_every", type=int, default=None)
    g.add_argument(
        "--deeplab_scale_schedule",
        type=schedule_flag,
        default=None,
        help="curriculum (orandnet spec 8): FACTOR:FRACTION phases over the iterations, e.g. 0.5:1,0.75:1,1:1 "
        "(images and masks scaled by the factor first; misc.curriculum); default: none",
    )
    g.add_argument(
        "--deeplab_crf",
        type=str2bool,
        default=True,
        help="dense CRF post-processing at eval, as in the papers' DeepLab numbers (the row says msf+crf)",
    )
    g.add_argument(
        "--deeplab_ignore_uncertain",
        type=str2bool,
        default=None,
        help="train on masks whose uncertain background (best walked score >= --conf_bg_thres) is ignored "
        "(255); make_sem_seg_labels writes them to <round>/sem_seg_ignore",
    )
    g.add_argument("--deeplab_gt", type=str2bool, default=False, help="train on GT masks (upper bound)")
    g.add_argument("--make_test_submission", type=str2bool, default=False)

    g = p.add_argument_group("report")
    g.add_argument("--report_images", type=int, default=6, help="images in report.html's gallery (a seeded sample)")

    for plugin in PLUGINS:
        plugin.add_arguments(p)

    g = p.add_argument_group("steps (true/false)")
    for name in STEP_PASSES:
        # Training passes default to "true unless weights were given" (resolved in _check_flags).
        default = None if name in ("train_cam", "train_irn", "train_affinity") else True
        g.add_argument(f"--{name}_pass", type=str2bool, default=default)
    return p


def rounds(args: argparse.Namespace) -> list[str]:
    """The rounds of this run: the baseline, then CDA's (the CAM method retrained with copy-paste)."""
    return ["baseline", "cda"] if args.cda else ["baseline"]


def round_args(args: argparse.Namespace, variant: str) -> argparse.Namespace:
    """A copy of the run's ``args`` for one round (``baseline`` or ``cda``): its output paths, and the list its
    pseudo masks are made for. ``args`` itself is never changed."""
    r = copy.copy(args)
    work_dir = Path(args.work_dir)
    root = work_dir / variant
    r.variant = variant
    r.cam_weights_name = str(root / "sess" / "cam.pth")
    r.irn_weights_name = str(root / "sess" / "irn.pth")
    r.affinity_weights_name = str(root / "sess" / "affinity.pth")
    r.cam_out_dir = str(root / "cam")
    r.ir_label_out_dir = str(root / "ir_label")
    r.sem_seg_out_dir = str(root / "sem_seg")
    r.sem_seg_ignore_dir = str(root / "sem_seg_ignore")
    r.ins_seg_out_dir = str(root / "ins_seg")
    sparse = args.supervision if args.supervision != "tags" else None
    r.deeplab_dir = str(work_dir / "deeplab" / ("gt" if args.deeplab_gt else sparse or variant))
    r.cda_bank_dir = str(work_dir / "cda" / "bank")
    # CDA's object bank is cut from the baseline round's pseudo masks (spec 10.2).
    r.bank_masks_dir = str(work_dir / "baseline" / "sem_seg")
    r.cam_aug = variant == "cda"
    # What the chosen plug-ins say every metrics row measures (misc.pipeline.record adds it).
    r.metrics_tags = {**methods.cam_method(args).tags(args), **methods.refiner(args).tags(args)}
    # The object bank needs the baseline's masks of every training image, DeepLab the last round's.
    all_rounds = rounds(args)
    if args.cda and variant == "baseline":
        r.infer_list = args.train_list
    elif args.train_deeplab_pass and variant == all_rounds[-1]:
        r.infer_list = args.deeplab_train_list
    return r


def make_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags (over ``--config``'s settings), apply the preset, resolve the dataset and its lists; the
    run's args, from which ``round_args`` derives each round's."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    if pre.config is not None:
        parser.set_defaults(**_read_config(pre.config, parser))
    args = parser.parse_args(argv)
    args.given_data_root = args.data_root
    if args.dataset is None:
        args.dataset = "voc12"
    if args.preset is None:
        args.preset = "demo" if args.data_root is None else "voc"
    # The CAM method's and the segmenter's published recipes (their ``presets``) win over the pipeline preset for
    # unset flags.
    cam_preset = methods.CAM_METHODS[args.cam_method].presets.get(args.preset, {})
    segmenter_preset = methods.SEGMENTERS[args.segmenter].presets.get(args.preset, {})
    for key, value in {**PRESETS[args.preset], **cam_preset, **segmenter_preset}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.work_dir = str(Path(args.work_dir).resolve())
    args.demo = args.data_root is None
    if args.demo:
        if args.dataset not in DEMO_FOLDERS:
            parser.error(f"there is no demo dataset for {args.dataset}: give its root with --data_root")
        args.data_root = str(Path(args.work_dir) / DEMO_FOLDERS[args.dataset])
    else:
        args.data_root = str(Path(args.data_root).expanduser().resolve())
    sparse = args.supervision != "tags"
    # A segmenter that does not learn from tags (AGMM) trained on ground truth needs no CAM round either.
    own_labels = sparse or args.deeplab_gt and "tags" not in methods.SEGMENTERS[args.segmenter].supervisions
    if own_labels or not dataset.from_args(args).has_background:
        # The tags-to-masks steps need a background class; on such a dataset the segmenter trains on masks.
        # Sparse labels need no CAM round at all: the segmenter learns from them directly.
        if not sparse and not args.deeplab_gt:
            parser.error(f"{args.dataset} has no background class, which the CAM pipeline needs: train the "
                         "segmenter on its ground truth (--deeplab_gt true)")
        args.cda = False
        for flag in STEP_PASSES:
            if flag not in SEGMENTER_PASSES:
                setattr(args, f"{flag}_pass", False)
    if args.cam_eval_sweep is None:
        args.cam_eval_sweep = [round(0.05 * i, 2) for i in range(1, 20)]
    # Thresholds left unset take the reference values, or the calibrated ones once eval_cam has run.
    unset = [name for name in REFERENCE if getattr(args, name) is None]
    args.calibrated_thresholds = unset if args.calibrate_thresholds else []
    if not args.calibrate_thresholds:
        for name in unset:
            setattr(args, name, REFERENCE[name])
    _check_flags(args, parser)
    if Path(args.data_root).is_dir():  # the demo's lists are resolved once run_pipeline has generated it
        try:
            resolve_lists(args)
        except UserError:
            if not args.demo:
                raise  # a demo whose generation was interrupted has no lists yet: run_pipeline regenerates it
    return args


DEMO_FOLDERS = {"voc12": "demo_voc12", "coco14": "demo_coco14"}
IRN_MIN_CROP = 4 * (TRAIN_RADIUS + 1)  # IRN's labels are at stride 4 and pair pixels up to TRAIN_RADIUS apart
SEGMENTER_PASSES = {flag for segmenter in methods.SEGMENTERS.values() for flag, _ in segmenter.steps}


def resolve_lists(args: argparse.Namespace) -> None:
    """Fill the list flags the user left unset from the dataset (its own lists, else shipped or scanned into
    ``<work_dir>/lists``); run once the dataset exists (the demo is generated first)."""
    info = dataset.from_args(args).check()
    for role, splits in info.default_lists.items():
        if getattr(args, role) is not None:
            continue
        found = next((p for split in splits if (p := info.list_path(split, Path(args.work_dir) / "lists"))), None)
        if found is None and role != "test_list":
            raise UserError(f"{info.root} has no {' or '.join(splits)} list for --{role} (neither its own nor a "
                            f"shipped one that fits it): pass --{role} FILE with one image id per line.")
        setattr(args, role, None if found is None else str(found))
    if args.deeplab_train_list is None:
        args.deeplab_train_list = args.train_list
    if args.ins_seg_list is None:
        args.ins_seg_list = args.eval_list
    if args.cls_labels is None:
        args.cls_labels = str(Path(args.work_dir) / "cls_labels.tsv")


def _read_config(path: str, parser: argparse.ArgumentParser) -> dict[str, object]:
    """The flag values of a ``config.yaml`` written by a run (keys starting with ``_`` are information)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--config {path} is unreadable ({e}): pass a config.yaml written by a run.") from e
    if not isinstance(raw, dict):
        raise UserError(f"--config {path} is not a mapping of flag names to values.")
    known = {a.dest for a in parser._actions}
    settings = {k: v for k, v in raw.items() if not str(k).startswith("_")}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserError(f"--config {path} has unknown settings {unknown[:5]}: remove them (see --help).")
    settings.pop("config", None)
    return settings


def write_config(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> Path:
    """Write ``<work_dir>/config.yaml``: every flag after presets (paths derived from the work dir or the
    dataset as given, their resolved values under ``_resolved``), the dataset and methods, and versions."""
    parser = parser or build_parser()
    dests = [a.dest for a in parser._actions if a.dest not in ("help", "config")]
    settings = {d: getattr(args, d) for d in dict.fromkeys(dests)}
    settings.update({name: None for name in DERIVED if name in settings})
    settings["data_root"] = args.given_data_root
    for name in REFERENCE:
        if name in args.calibrated_thresholds:
            settings[name] = None  # calibrated per round (<round>/calibration.json)
    info = dataset.from_args(args)
    doc = {
        **{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "_resolved": {name: getattr(args, name) for name in DERIVED},
        "_dataset": {"name": info.name, "root": str(info.root), "num_classes": info.num_classes,
                     "class_names": list(info.class_names)},
        "_versions": {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
                      "project": _project_version()},
    }
    path = Path(args.work_dir) / "config.yaml"
    with atomic_write(path, "w") as f:
        f.write("# Resolved settings of this run; re-run it with: python run_sample.py --config THIS_FILE\n")
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def _project_version() -> str:
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_DIR), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _check_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.eval_released:
        if args.demo:
            parser.error("--eval_released evaluates VOC models: give --voc12_root as well")
        for name, value in RELEASED[args.eval_released].items():
            if name.endswith("_weights") and name != "backbone_weights":
                setattr(args, name, getattr(args, name) or value)  # weights the user gives win
            else:
                setattr(args, name, value)  # the settings the released weights were made with
        args.cda = False
        args.train_deeplab_pass = args.eval_deeplab_pass = False
    if None not in (args.conf_bg_thres, args.conf_fg_thres) and args.conf_bg_thres >= args.conf_fg_thres:
        parser.error(f"--conf_bg_thres ({args.conf_bg_thres}) must be below --conf_fg_thres ({args.conf_fg_thres})")
    if not 0 < args.cda_min_ratio < args.cda_max_ratio <= 1:
        parser.error("need 0 < --cda_min_ratio < --cda_max_ratio <= 1")
    for net in ("cam", "irn", "affinity"):
        weights, train_pass = getattr(args, f"{net}_weights"), f"train_{net}_pass"
        if getattr(args, train_pass) is None:
            setattr(args, train_pass, weights is None)
        elif weights and getattr(args, train_pass):
            parser.error(f"--{net}_weights and --{train_pass} true contradict: the given weights would be ignored")
    positive = ("cam_batch_size", "irn_batch_size", "deeplab_batch_size", "cam_num_epoches", "irn_num_epoches",
                "deeplab_iters", "cam_crop_size", "deeplab_crop_size", "report_images", "cam_max_side",
                "max_image_side")
    problem = out_of_bounds(args, positive, 1) or out_of_bounds(args, ("num_workers", "seed", "exp_times"), 0)
    if problem is not None:
        parser.error(problem)
    if args.irn_crop_size < IRN_MIN_CROP:
        parser.error(f"--irn_crop_size {args.irn_crop_size} is too small for IRN's pair radius {TRAIN_RADIUS} at "
                     f"stride 4: use at least {IRN_MIN_CROP}")
    for name in ("cam_eval_thres", *REFERENCE):
        value = getattr(args, name)
        if value is not None and not 0 < value < 1:
            parser.error(f"--{name} must lie in (0, 1), got {value}")
    if any(not 0 < t < 1 for t in args.cam_eval_sweep):
        parser.error(f"--cam_eval_sweep thresholds must lie in (0, 1), got {args.cam_eval_sweep}")
    for name in ("cam_scales", "deeplab_eval_scales", "cam_resize_long"):
        if any(v <= 0 for v in getattr(args, name)):
            parser.error(f"--{name} must be positive, got {list(getattr(args, name))}")
    if any(n < 1 for n in args.demo_size) or args.demo_size[1] > args.demo_size[0]:
        parser.error(f"--demo_size needs 1 <= TRAIN <= TRAIN_AUG and VAL >= 1, got {list(args.demo_size)}")
    try:
        torch.device(args.device)
    except RuntimeError:
        if args.device != "auto":
            parser.error(f"--device {args.device!r} is not a device: use auto, cpu, cuda or cuda:N")
    learns_from = methods.SEGMENTERS[args.segmenter].supervisions
    if args.supervision not in learns_from and not args.deeplab_gt:
        able = [name for name, s in methods.SEGMENTERS.items() if args.supervision in s.supervisions]
        parser.error(f"--segmenter {args.segmenter} learns from {' or '.join(learns_from)}, not --supervision "
                     f"{args.supervision}: pass --supervision {' or '.join(learns_from)}, or --segmenter "
                     f"{' or '.join(able)}")
    if args.supervision != "tags" and args.deeplab_gt:
        parser.error(f"--deeplab_gt true and --supervision {args.supervision} contradict: choose one training label")
    for plugin in (methods.cam_method(args), methods.refiner(args), methods.segmenter(args)):
        problem = plugin.check_args(args)
        if problem is not None:
            parser.error(problem)
    work_dir = Path(args.work_dir)
    blocking = next((p for p in (work_dir, *work_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        parser.error(f"--work_dir {work_dir} cannot be a folder: {blocking} is a file")
    existing = next(p for p in (work_dir, *work_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--work_dir {work_dir} is not writable ({existing} is read-only): choose another folder")


def check_lists(args: argparse.Namespace) -> None:
    """Every id list the run reads exists, is not empty, names each image once, names images the dataset has,
    and holds a training batch."""
    info = dataset.from_args(args)
    batches = {}
    # The networks this run trains on the training list: the chosen plug-ins' training steps that are on.
    chosen = {flag for plugin in (methods.cam_method(args), methods.refiner(args)) for flag, _ in plugin.steps}
    trains = {"cam": "train_cam", "irn": "train_irn", "aff": "train_affinity"}
    sizes = [getattr(args, f"{net}_batch_size") for net, flag in trains.items()
             if flag in chosen and getattr(args, f"{flag}_pass")]
    if sizes:
        batches["train_list"] = max(sizes)
    if args.train_deeplab_pass:
        batches["deeplab_train_list"] = args.deeplab_batch_size
    # A file serving several roles (train_list is deeplab_train_list by default) is read and checked once.
    roles: dict[str, str] = {}  # list file -> the first role it serves
    for role in ("train_list", "val_list", "infer_list", "eval_list", "deeplab_train_list"):
        roles.setdefault(getattr(args, role), role)
    need: dict[str, int] = {}  # list file -> the largest training batch drawn from it
    for role, batch in batches.items():
        need[getattr(args, role)] = max(need.get(getattr(args, role), 1), batch)
    for role in roles.values():
        ids = read_id_list(getattr(args, role))
        if not ids:
            raise UserError(f"--{role} {getattr(args, role)} lists no image: give a list with one id per line.")
        seen: set[str] = set()
        twice = next((i for i in ids if i in seen or seen.add(i)), None)
        if twice is not None:
            raise UserError(f"--{role} {getattr(args, role)} names {twice} more than once (it would count twice): "
                            "remove the duplicates.")
        missing = [i for i in ids if not info.image(i).is_file()]
        if missing:
            raise UserError(f"--{role} {getattr(args, role)}: {len(missing)} of its {len(ids)} images are missing "
                            f"(first: {info.image(missing[0])}): fix the list or the dataset root.")
        if len(ids) < need.get(getattr(args, role), 0):
            raise UserError(f"--{role} {getattr(args, role)} has {len(ids)} images, fewer than one training batch "
                            f"({need[getattr(args, role)]}): lower the batch size or use a longer list.")


def _run_step(module: str, args: argparse.Namespace, timings: Path) -> None:
    step = importlib.import_module(f"step.{module}")
    log.info("=== %s (%s)", module, args.variant)
    start = time.perf_counter()
    step.run(args)
    dist.barrier()
    seconds = time.perf_counter() - start
    if dist.is_main():
        with open(timings, "a") as f:
            f.write(json.dumps({"step": module, "variant": args.variant, "seconds": round(seconds, 2)}) + "\n")
    log.info("--- %s done in %.1f s", module, seconds)


def check_weights(args: argparse.Namespace) -> None:
    """Every weights file the run was given exists and reads (registry names are fetched first): the state
    dicts, the ViT checkpoint of a ViT run, the saliency model of ``--saliency_model``."""
    checks = [(f"--{flag}", getattr(args, flag), read_checkpoint)
              for flag in ("backbone_weights", "deeplab_weights", "cam_weights", "irn_weights", "affinity_weights")]
    if args.cam_method == "vit" and args.train_cam_pass:
        checks.append(("--vit_weights", vit_weights(args), read_vit_checkpoint))
    if args.refiner == "saliency" and args.saliency_model:
        checks.append((f"--saliency_model {args.saliency_model}", SALIENCY_MODELS[args.saliency_model][0], None))
    for label, spec, read in checks:
        try:
            path = resolve_weights(spec)
            if path is not None and read is not None:
                read(path)
        except UserError as e:
            raise UserError(f"{label}: {user_message(e)}") from None


def prepare_run(args: argparse.Namespace) -> None:
    """The validation pass before anything is written: the dataset (the demo is generated if missing), its
    lists and every weights file. A bad input stops the run here, with every finished output untouched."""
    if args.demo:
        _run_demo_generator(args)
    dataset.from_args(args).check()
    resolve_lists(args)
    check_lists(args)
    check_weights(args)


def run_pipeline(args: argparse.Namespace) -> None:
    """Sequence the steps of the chosen plug-ins (after ``prepare_run``); the steps do all the work."""
    work_dir = Path(args.work_dir)
    timings = work_dir / "timings.jsonl"
    if dist.is_main():
        write_config(args)
        # Present while the steps run (and after a crash): benchmarks count only runs without it as finished.
        (work_dir / IN_PROGRESS).write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n")
    round_steps = [*methods.cam_method(args).steps, *methods.refiner(args).steps]
    if any(getattr(args, f"{flag}_pass") for flag, _ in round_steps):
        _run_step("make_cls_labels", round_args(args, "baseline"), timings)
    for variant in rounds(args):
        r = round_args(args, variant)
        if variant == "cda" and args.make_aug_fg_pass:
            _run_step("make_aug_fg", r, timings)
        for flag, module in round_steps:
            if getattr(args, f"{flag}_pass"):
                _run_step(module, r, timings)
    final = round_args(args, rounds(args)[-1])
    for flag, module in methods.segmenter(args).steps:
        if getattr(args, f"{flag}_pass"):
            _run_step(module, final, timings)
    if args.report_pass:
        _run_step("report", final, timings)
    if dist.is_main():
        (work_dir / IN_PROGRESS).unlink(missing_ok=True)
        print(summary_table(work_dir))


def _run_demo_generator(args: argparse.Namespace) -> None:
    from voc12.demo import make_demo_coco, make_demo_dataset

    if dist.is_main():
        n_train_aug, n_train, n_val = args.demo_size
        start = time.perf_counter()
        if args.dataset == "coco14":
            make_demo_coco(args.data_root, seed=args.seed, n_train=n_train_aug, n_val=n_val,
                           p_typical=args.demo_context_bias)
        else:
            make_demo_dataset(args.data_root, seed=args.seed, n_train_aug=n_train_aug, n_train=n_train, n_val=n_val,
                              p_typical=args.demo_context_bias)
        log.info("demo dataset ready in %s (%.1f s)", args.data_root, time.perf_counter() - start)
    dist.barrier()


def summary_table(work_dir: str | os.PathLike) -> str:
    """One line per (variant, step) of the latest results in metrics.jsonl, plus each step's wall time."""
    latest = latest_metrics(work_dir)
    times: dict[tuple[str, str], float] = {}
    timings = Path(work_dir) / "timings.jsonl"
    if timings.is_file():
        for line in timings.read_text().splitlines():
            t = json.loads(line)
            times[(t["variant"], t["step"])] = t["seconds"]
    lines = [f"{'variant':<9} {'step':<14} {'split':<7} {'metric':<17} {'value':>7}  {'extra'}"]
    for (variant, step, post), row in latest.items():
        metric, value = headline(row)
        extra = []
        if "threshold" in row:
            extra.append(f"thres={row['threshold']}")
        if post:
            extra.append(post)
        if "ignored" in row:
            extra.append(f"(labelled pixels; {100 * row['ignored']:.0f}% ignored)")
        if "fg_precision" in row:
            extra.append(seed_details(row))
        lines.append(f"{variant:<9} {step:<14} {row.get('split', '-'):<7} {metric:<17} {value:7.2f}  {' '.join(extra)}")
    if times:
        lines.append("")
        lines.append(f"{'variant':<9} {'step':<22} {'seconds':>8}")
        lines += [f"{v:<9} {s:<22} {sec:8.1f}" for (v, s), sec in times.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    for old in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(old)  # main() may run several times in one process (tests, notebooks)
        old.close()
    try:
        args = make_args(argv)
        dist.init(args.device)
        if not dist.is_main():
            log.setLevel(logging.WARNING)
        prepare_run(args)
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        file_log = logging.FileHandler(Path(args.work_dir) / "log.txt")
        file_log.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(file_log)
        dist.seed_everything(args.seed)
        run_pipeline(args)
    except UserError as e:
        # A progress bar the error interrupted is ended first, so the error starts a line of its own.
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
