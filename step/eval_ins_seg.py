"""Evaluate instance pseudo labels (spec 8.4): VOC mask AP at IoU 0.25/0.5/0.75 against SegmentationObject.

Also exports the detections as a COCO-format JSON (RLE masks) for training an instance segmenter.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from misc import dist
from misc.instances import coco_json
from misc.io import load_png, save_json
from misc.metrics import instance_ap, instances_from_voc
from misc.pipeline import record, require_files, split_name
from voc12.dataset import CLASS_NAMES, VOCLayout, read_id_list

log = logging.getLogger("wsss")

IOU_THRESHOLDS = (0.25, 0.5, 0.75)


def load_detections(path: str | Path) -> dict[str, np.ndarray]:
    """A ``make_ins_seg_labels`` output: score (M,), class (M,), mask bool (M, H, W)."""
    with np.load(path, allow_pickle=False) as data:
        h, w = data["shape"]
        masks = np.unpackbits(data["mask_bits"], count=len(data["score"]) * h * w).reshape(-1, h, w).astype(bool)
        return {"score": data["score"], "class": data["class"], "mask": masks}


def run(args: argparse.Namespace) -> None:
    if not dist.is_main():
        return
    ids = read_id_list(args.ins_seg_list)
    require_files(args.ins_seg_out_dir, ids, ".npz", "make_ins_seg_labels")
    layout = VOCLayout(args.voc12_root)
    have_gt = [i for i in ids if layout.seg_object(i).is_file() and layout.seg_class(i).is_file()]
    detections = [load_detections(Path(args.ins_seg_out_dir) / f"{i}.npz") for i in ids]

    sizes = [d["mask"].shape[1:] for d in detections]
    save_json(Path(args.ins_seg_out_dir).parent / "instances_coco.json", coco_json(ids, sizes, detections, CLASS_NAMES))
    if not have_gt:
        log.info("eval_ins_seg: no SegmentationObject masks for %s; exported COCO JSON only", args.ins_seg_list)
        return
    if len(have_gt) < len(ids):
        log.info("eval_ins_seg: %d of %d images have SegmentationObject masks; scoring those", len(have_gt), len(ids))

    by_id = dict(zip(ids, detections, strict=True))
    gt_masks, gt_labels, gt_void = [], [], []
    for image_id in have_gt:
        seg_object, seg_class = load_png(layout.seg_object(image_id)), load_png(layout.seg_class(image_id))
        masks, labels = instances_from_voc(seg_object, seg_class)
        gt_masks.append(masks)
        gt_labels.append(labels)
        gt_void.append(seg_object == 255)
    dets = [by_id[i] for i in have_gt]
    row: dict = {"step": "eval_ins_seg", "split": split_name(args.ins_seg_list)}
    for thresh in IOU_THRESHOLDS:
        ap, mean_ap = instance_ap(
            [d["mask"] for d in dets], [d["class"] for d in dets], [d["score"] for d in dets],
            gt_masks, gt_labels, iou_thresh=thresh, num_classes=len(CLASS_NAMES), gt_void=gt_void,
        )
        row[f"map@{thresh}"] = 100 * mean_ap
        if thresh == 0.5:
            row["map"] = 100 * mean_ap
            row["per_class_ap"] = {
                n: None if np.isnan(a) else 100 * float(a) for n, a in zip(CLASS_NAMES, ap, strict=True)
            }
    record(args, row)
