"""Evaluate CAMs as segmentations (spec 5): background = a constant plane at a threshold.

Sweeps thresholds around ``cam_eval_thres`` in one pass over the files; the row in metrics.jsonl reports
the configured threshold (the number papers quote) and the sweep with its best threshold beside it. With
``--calibrate_thresholds`` the best threshold also sets the later steps' thresholds (misc.thresholds).
"""

from __future__ import annotations

import argparse

import numpy as np

import dataset
from dataset.base import read_id_list
from misc import dist
from misc.io import load_cam
from misc.labels import scores_to_label
from misc.pipeline import evaluate_segmentation, record, require_files, split_name
from misc.thresholds import save_calibration


def run(args: argparse.Namespace) -> None:
    if not dist.is_main():
        return
    ids = read_id_list(args.eval_list)
    require_files(args.cam_out_dir, ids, ".npz", "make_cam")
    thresholds = sorted({*args.cam_eval_sweep, args.cam_eval_thres})

    def predict(image_id: str) -> list[np.ndarray]:
        cams = load_cam(f"{args.cam_out_dir}/{image_id}.npz")
        return [scores_to_label(cams["high_res"], cams["keys"], t) for t in thresholds]

    scores = evaluate_segmentation(dataset.from_args(args), ids, predict, "eval_cam")
    sweep = {f"{t:.2f}": s["miou"] for t, s in zip(thresholds, scores, strict=True)}
    best = max(sweep, key=sweep.get)
    chosen = scores[thresholds.index(args.cam_eval_thres)]
    split = split_name(args.eval_list)
    record(args, {"step": "eval_cam", "split": split, "threshold": args.cam_eval_thres,
                  **chosen, "sweep": sweep, "best_threshold": float(best)})
    if args.calibrate_thresholds:
        save_calibration(args, float(best), split)
