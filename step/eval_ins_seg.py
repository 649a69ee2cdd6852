"""Evaluate instance pseudo labels (spec 8.4): VOC mask AP at IoU 0.25/0.5/0.75 against SegmentationObject.

Also exports the detections as a COCO-format JSON (RLE masks) for training an instance segmenter.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

import dataset
from dataset.base import read_id_list
from misc import dist
from misc.instances import coco_json
from misc.io import save_json
from misc.metrics import instance_ap, instances_from_voc
from misc.pipeline import record, require_files, split_name

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
    info = dataset.from_args(args)
    have_gt = [i for i in ids if info.seg_object(i) is not None and info.seg_object(i).is_file() and info.has_mask(i)]
    detections = [load_detections(Path(args.ins_seg_out_dir) / f"{i}.npz") for i in ids]

    sizes = [d["mask"].shape[1:] for d in detections]
    coco = coco_json(ids, sizes, detections, info.class_names)
    save_json(Path(args.ins_seg_out_dir).parent / "instances_coco.json", coco)
    if not have_gt:
        log.info("eval_ins_seg: no instance masks for %s; exported COCO JSON only", args.ins_seg_list)
        return
    if len(have_gt) < len(ids):
        log.info("eval_ins_seg: %d of %d images have instance masks; scoring those", len(have_gt), len(ids))

    by_id = dict(zip(ids, detections, strict=True))
    gt_masks, gt_labels, gt_void = [], [], []
    for image_id in have_gt:
        seg_object, seg_class = info.read_instances(image_id), info.read_mask(image_id)
        masks, labels = instances_from_voc(seg_object, seg_class)
        gt_masks.append(masks)
        gt_labels.append(labels)
        gt_void.append(seg_object == 255)
    dets = [by_id[i] for i in have_gt]
    row: dict = {"step": "eval_ins_seg", "split": split_name(args.ins_seg_list)}
    for thresh in IOU_THRESHOLDS:
        ap, mean_ap = instance_ap(
            [d["mask"] for d in dets], [d["class"] for d in dets], [d["score"] for d in dets],
            gt_masks, gt_labels, num_classes=info.num_classes, iou_thresh=thresh, gt_void=gt_void,
        )
        row[f"map@{thresh}"] = 100 * mean_ap
        if thresh == 0.5:
            row["map"] = 100 * mean_ap
            row["per_class_ap"] = {
                n: None if np.isnan(a) else 100 * float(a) for n, a in zip(info.class_names, ap, strict=True)
            }
    record(args, row)
