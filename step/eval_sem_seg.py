"""Evaluate the semantic pseudo masks on the evaluation list (spec 9): mIoU, precision, recall."""

from __future__ import annotations

import argparse
from pathlib import Path

from misc import dist
from misc.io import load_png
from misc.pipeline import evaluate_segmentation, record, require_files, split_name
from voc12.dataset import read_id_list


def run(args: argparse.Namespace) -> None:
    if not dist.is_main():
        return
    ids = read_id_list(args.eval_list)
    require_files(args.sem_seg_out_dir, ids, ".png", "make_sem_seg_labels")
    (scores,) = evaluate_segmentation(
        args, ids, lambda image_id: load_png(Path(args.sem_seg_out_dir) / f"{image_id}.png"), "eval_sem_seg"
    )
    record(args, {"step": "eval_sem_seg", "split": split_name(args.eval_list), **scores})
