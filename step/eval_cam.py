"""Evaluate CAMs as segmentations (spec 5): background = a constant plane at a threshold.

Sweeps thresholds around ``cam_eval_thres`` in one pass over the files; the row in metrics.jsonl reports
the configured threshold (the number papers quote, with its mean precision and recall) and the sweep with
its best threshold beside it, plus each threshold's mean precision / recall and the precision-aware threshold
(the first where precision exceeds recall, orandnet spec 9; ``misc.pipeline.score_cam_store``). With
``--calibrate_thresholds`` the best threshold also sets the later steps' thresholds (misc.thresholds).
"""

from __future__ import annotations

import argparse

from misc import dist
from misc.pipeline import record, score_cam_store
from misc.thresholds import save_calibration


def run(args: argparse.Namespace) -> None:
    if not dist.is_main():
        return
    row = score_cam_store(args, args.cam_out_dir, "eval_cam", "make_cam")
    record(args, row)
    if args.calibrate_thresholds:
        save_calibration(args, row["best_threshold"], row["split"])
