"""Run the WSSS pipeline: CAM -> (CDA) -> IRNet pseudo masks -> DeepLab, one step module at a time.

    python run_sample.py                                     # embedded demo dataset, CPU-sized preset
    python run_sample.py --voc12_root ~/data/VOCdevkit/VOC2012   # PASCAL VOC, IRNet defaults
    torchrun --nproc_per_node=4 run_sample.py --voc12_root ...    # the same on 4 GPUs (DDP)

Every step reads its inputs from and writes its outputs to ``--work_dir``; ``--<step>_pass false``
skips a step, and re-running resumes per image where a step was interrupted.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from misc import dist
from misc.errors import UserError
from misc.io import read_metrics
from misc.thresholds import REFERENCE, WALKED, apply_calibration

log = logging.getLogger("wsss")

SHIPPED_LISTS = Path(__file__).resolve().parent / "voc12" / "data"

# Preset values fill every flag the user did not give. "voc" is IRNet/CDA's published configuration
# (spec section 12); "demo" is sized so the whole pipeline runs in minutes on a 2-core CPU.
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
        deeplab_ignore_uncertain=False,
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
        # The masks' background holds every object part the walk left below the threshold; learning those
        # as background shrank DeepLab's objects far below the masks' (step.train_deeplab.label_dir).
        deeplab_ignore_uncertain=True,
    ),
}

# (pass flag, step module, rounds it runs in). The CDA round repeats the CAM and IRN stages with
# copy-paste in train_cam only (spec 10.5); DeepLab trains once, on the last round's pseudo masks.
ROUND_STEPS = [
    ("train_cam", "train_cam"),
    ("make_cam", "make_cam"),
    ("eval_cam", "eval_cam"),
    ("cam_to_ir_label", "cam_to_ir_label"),
    ("train_irn", "train_irn"),
    ("make_sem_seg", "make_sem_seg_labels"),
    ("eval_sem_seg", "eval_sem_seg"),
    ("make_ins_seg", "make_ins_seg_labels"),
    ("eval_ins_seg", "eval_ins_seg"),
]
STEP_PASSES = [flag for flag, _ in ROUND_STEPS] + ["make_aug_fg", "train_deeplab", "eval_deeplab"]


def str2bool(value: str) -> bool:
    """Real booleans for flags: ``--train_cam_pass false`` means false (the reference's ``is True`` did not)."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("environment")
    g.add_argument("--voc12_root", default=None, help="VOC2012 root (with JPEGImages/); default: demo dataset")
    g.add_argument("--work_dir", default="work_dir", help="every output goes under this folder")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: demo without --voc12_root")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--num_workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--amp", type=str2bool, default=True, help="mixed precision on CUDA (ignored on CPU)")
    g.add_argument("--demo_size", type=int, nargs=3, default=(200, 80, 80), metavar=("TRAIN_AUG", "TRAIN", "VAL"))
    g.add_argument(
        "--demo_context_bias",
        type=float,
        default=0.85,
        help="fraction of a demo class's images on its typical background (the bias CDA addresses)",
    )

    g = p.add_argument_group("dataset lists (default: shipped VOC lists, or the demo's)")
    for name in ("train_list", "val_list", "infer_list", "eval_list", "test_list"):
        g.add_argument(f"--{name}", default=None)
    g.add_argument("--ins_seg_list", default=None, help="ids for instance pseudo labels (default: eval_list)")
    g.add_argument("--cls_labels", default=None, help="labels TSV cache (default: <work_dir>/cls_labels.tsv)")

    g = p.add_argument_group("networks")
    g.add_argument("--backbone", choices=["resnet50", "resnet101", "efficientnet_lite0"], default=None)
    g.add_argument("--backbone_weights", default=None, help="checkpoint path, registry name, or none")
    g.add_argument("--cam_weights", default=None, help="evaluate these CAM weights instead of training")
    g.add_argument("--irn_weights", default=None, help="use these IRN weights instead of training")
    g.add_argument(
        "--eval_released",
        type=str2bool,
        default=False,
        help="download CDA's released ResNet-50 CAM and IRN weights and run make_cam -> eval -> pseudo masks -> eval",
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
    g.add_argument("--deeplab_backbone", choices=["resnet50", "resnet101", "efficientnet_lite0"], default=None)
    g.add_argument("--deeplab_weights", default=None)
    g.add_argument("--deeplab_train_list", default=None, help="ids DeepLab trains on (default: --train_list)")
    g.add_argument("--deeplab_output_stride", type=int, choices=[8, 16], default=None)
    g.add_argument("--deeplab_crop_size", type=int, default=None)
    g.add_argument("--deeplab_batch_size", type=int, default=None)
    g.add_argument("--deeplab_iters", type=int, default=None)
    g.add_argument("--deeplab_learning_rate", type=float, default=None)
    g.add_argument("--deeplab_weight_decay", type=float, default=5e-4)
    g.add_argument("--deeplab_eval_scales", type=float, nargs="+", default=None)
    g.add_argument("--deeplab_ckpt_every", type=int, default=None)
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

    g = p.add_argument_group("steps (true/false)")
    for name in STEP_PASSES:
        # Training passes default to "true unless weights were given" (resolved in _check_flags).
        default = None if name in ("train_cam", "train_irn") else True
        g.add_argument(f"--{name}_pass", type=str2bool, default=default)
    return p


def _round_paths(args: argparse.Namespace, variant: str) -> argparse.Namespace:
    """A copy of ``args`` whose output paths belong to one round (``baseline`` or ``cda``)."""
    r = copy.copy(args)
    root = Path(args.work_dir) / variant
    r.variant = variant
    r.cam_weights_name = str(root / "sess" / "cam.pth")
    r.irn_weights_name = str(root / "sess" / "irn.pth")
    r.cam_out_dir = str(root / "cam")
    r.ir_label_out_dir = str(root / "ir_label")
    r.sem_seg_out_dir = str(root / "sem_seg")
    r.sem_seg_ignore_dir = str(root / "sem_seg_ignore")
    r.ins_seg_out_dir = str(root / "ins_seg")
    r.deeplab_dir = str(Path(args.work_dir) / "deeplab" / ("gt" if args.deeplab_gt else variant))
    r.cda_bank_dir = str(Path(args.work_dir) / "cda" / "bank")
    r.cam_aug = variant == "cda"
    return r


def make_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags, apply the preset, resolve list paths; the result is the baseline round's args."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset is None:
        args.preset = "demo" if args.voc12_root is None else "voc"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.work_dir = str(Path(args.work_dir).resolve())
    args.demo = args.voc12_root is None
    if args.demo:
        args.voc12_root = str(Path(args.work_dir) / "demo_voc12")
    lists = Path(args.voc12_root) / "ImageSets" / "Segmentation" if args.demo else SHIPPED_LISTS
    defaults = {"train_list": "train_aug.txt", "val_list": "val.txt", "infer_list": "train.txt",
                "eval_list": "train.txt", "test_list": "test.txt"}
    for key, file in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, str(lists / file))
    if args.deeplab_train_list is None:
        args.deeplab_train_list = args.train_list
    if args.ins_seg_list is None:
        args.ins_seg_list = args.eval_list
    if args.cls_labels is None:
        args.cls_labels = str(Path(args.work_dir) / "cls_labels.tsv")
    if args.cam_eval_sweep is None:
        args.cam_eval_sweep = [round(0.05 * i, 2) for i in range(1, 20)]
    # Thresholds left unset take the reference values, or the calibrated ones once eval_cam has run.
    unset = [name for name in REFERENCE if getattr(args, name) is None]
    args.calibrated_thresholds = unset if args.calibrate_thresholds else []
    if not args.calibrate_thresholds:
        for name in unset:
            setattr(args, name, REFERENCE[name])
    _check_flags(args, parser)
    return _round_paths(args, "baseline")


def _check_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.eval_released:
        if args.demo:
            parser.error("--eval_released evaluates VOC models: give --voc12_root as well")
        args.cam_weights = args.cam_weights or "cda_irnet_resnet50_cam"
        args.irn_weights = args.irn_weights or "cda_irnet_resnet50_irn"
        args.cda = False
        args.train_deeplab_pass = args.eval_deeplab_pass = False
    if None not in (args.conf_bg_thres, args.conf_fg_thres) and args.conf_bg_thres >= args.conf_fg_thres:
        parser.error(f"--conf_bg_thres ({args.conf_bg_thres}) must be below --conf_fg_thres ({args.conf_fg_thres})")
    if not 0 < args.cda_min_ratio < args.cda_max_ratio <= 1:
        parser.error("need 0 < --cda_min_ratio < --cda_max_ratio <= 1")
    for net in ("cam", "irn"):
        weights, train_pass = getattr(args, f"{net}_weights"), f"train_{net}_pass"
        if getattr(args, train_pass) is None:
            setattr(args, train_pass, weights is None)
        elif weights and getattr(args, train_pass):
            parser.error(f"--{net}_weights and --{train_pass} true contradict: the given weights would be ignored")
    for name in ("cam_batch_size", "irn_batch_size", "deeplab_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")


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


def run_pipeline(args: argparse.Namespace) -> None:
    """Sequence the steps; the steps do all the work."""
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    timings = work_dir / "timings.jsonl"
    if args.demo:
        _run_demo_generator(args)
    _run_step("make_cls_labels", args, timings)

    needs_all_masks = args.cda or args.train_deeplab_pass
    rounds = ["baseline", "cda"] if args.cda else ["baseline"]
    for i, variant in enumerate(rounds):
        r = _round_paths(args, variant)
        if needs_all_masks and (args.cda and variant == "baseline" or i == len(rounds) - 1):
            for_bank = variant == "baseline" and args.cda
            r.infer_list = args.train_list if for_bank else args.deeplab_train_list
            log.info("infer_list = %s for the %s round: %s needs pseudo masks for every training image",
                     r.infer_list, variant, "the CDA object bank" if for_bank else "DeepLab training")
        if variant == "cda" and args.make_aug_fg_pass:
            # The bank is cut from the baseline round's pseudo masks (spec 10.2).
            bank_args = copy.copy(r)
            bank_args.sem_seg_out_dir = _round_paths(args, "baseline").sem_seg_out_dir
            _run_step("make_aug_fg", bank_args, timings)
        for flag, module in ROUND_STEPS:
            if getattr(args, f"{flag}_pass"):
                _run_step(module, r, timings)
            if flag == "eval_cam" and args.calibrated_thresholds and any(
                getattr(args, f"{later}_pass") for later in ("cam_to_ir_label", "make_sem_seg", "make_ins_seg")
            ):
                apply_calibration(r)
    final = _round_paths(args, rounds[-1])
    if args.train_deeplab_pass:
        _run_step("train_deeplab", final, timings)
    if args.eval_deeplab_pass:
        _run_step("eval_deeplab", final, timings)
    if dist.is_main():
        print(summary_table(work_dir))


def _run_demo_generator(args: argparse.Namespace) -> None:
    from voc12.demo import make_demo_dataset

    if dist.is_main():
        n_train_aug, n_train, n_val = args.demo_size
        start = time.perf_counter()
        make_demo_dataset(args.voc12_root, seed=args.seed, n_train_aug=n_train_aug, n_train=n_train, n_val=n_val,
                          p_typical=args.demo_context_bias)
        log.info("demo dataset ready in %s (%.1f s)", args.voc12_root, time.perf_counter() - start)
    dist.barrier()


def summary_table(work_dir: str | os.PathLike) -> str:
    """One line per (variant, step) of the latest results in metrics.jsonl, plus each step's wall time."""
    latest: dict[tuple[str, str, str], dict] = {}
    for row in read_metrics(work_dir):
        key = (row.get("variant", "-"), row["step"], row.get("postprocess", ""))
        latest[key] = row
    times: dict[tuple[str, str], float] = {}
    timings = Path(work_dir) / "timings.jsonl"
    if timings.is_file():
        for line in timings.read_text().splitlines():
            t = json.loads(line)
            times[(t["variant"], t["step"])] = t["seconds"]
    lines = [f"{'variant':<9} {'step':<14} {'split':<7} {'metric':<12} {'value':>7}  {'extra'}"]
    for (variant, step, post), row in latest.items():
        metric, value = ("mAP@0.5", row["map"]) if "map" in row else ("mIoU", row["miou"])
        extra = []
        if "threshold" in row:
            extra.append(f"thres={row['threshold']}")
        if post:
            extra.append(post)
        if "ignored" in row:
            extra.append(f"(labelled pixels; {100 * row['ignored']:.0f}% ignored)")
        lines.append(f"{variant:<9} {step:<14} {row.get('split', '-'):<7} {metric:<12} {value:7.2f}  {' '.join(extra)}")
    if times:
        lines.append("")
        lines.append(f"{'variant':<9} {'step':<22} {'seconds':>8}")
        lines += [f"{v:<9} {s:<22} {sec:8.1f}" for (v, s), sec in times.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    try:
        args = make_args(argv)
        dist.init(args.device)
        if not dist.is_main():
            log.setLevel(logging.WARNING)
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        for old in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            log.removeHandler(old)  # main() may run several times in one process (tests, notebooks)
        file_log = logging.FileHandler(Path(args.work_dir) / "log.txt")
        file_log.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(file_log)
        dist.seed_everything(args.seed)
        run_pipeline(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
