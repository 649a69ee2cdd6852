"""Evaluate IRN's confident seeds (``cam_to_ir_label``'s output) against the ground truth.

The seeds bound what IRN can learn: its boundaries come from where fg and bg seeds of different classes
meet. Scored on the images of the evaluation list that have seeds (``train_list``): fg / bg seed precision
and recall, and the share of pixels seeded (``misc.metrics.seed_scores``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

import dataset
from dataset.base import read_id_list
from misc import dist
from misc.errors import UserError
from misc.io import load_png
from misc.metrics import seed_confusion, seed_scores
from misc.pipeline import record, require_files, require_gt, split_name


def run(args: argparse.Namespace) -> None:
    if not dist.is_main():
        return
    seeded = set(read_id_list(args.train_list))
    ids = [i for i in read_id_list(args.eval_list) if i in seeded]
    if not ids:
        raise UserError(f"no image of --eval_list {args.eval_list} is in --train_list {args.train_list}, so none "
                        "has seeds to score: pass an eval list drawn from the training images, or "
                        "--eval_ir_label_pass false.")
    require_files(args.ir_label_out_dir, ids, ".png", "cam_to_ir_label")
    info = dataset.from_args(args)
    require_gt(info, ids)
    conf = np.zeros((info.num_labels, info.num_labels + 1), dtype=np.int64)
    for image_id in tqdm(ids, desc="eval_ir_label", mininterval=2):
        seeds = load_png(Path(args.ir_label_out_dir) / f"{image_id}.png")
        conf += seed_confusion(info.read_mask(image_id), seeds, info.num_labels, info.ignore)
    record(args, {"step": "eval_ir_label", "split": split_name(args.eval_list), "images": len(ids),
                  **seed_scores(conf, info.label_names)})
