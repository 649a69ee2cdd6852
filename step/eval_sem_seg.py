"""Evaluate the semantic pseudo masks on the evaluation list (spec 9): mIoU, precision, recall.

With ``--deeplab_ignore_uncertain`` the masks DeepLab learns from (uncertain background ignored) get a
second row, ``"postprocess": "ignore_uncertain"``: scores over the pixels they label, and the fraction
of valid pixels they leave out (``ignored``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import dataset
from dataset.base import DatasetInfo, read_id_list
from misc import dist
from misc.io import load_png
from misc.labels import IGNORE
from misc.metrics import confusion_matrix, segmentation_scores
from misc.pipeline import evaluate_segmentation, record, require_files, split_name


def labelled_pixel_scores(info: DatasetInfo, ids: list[str], mask_dir: Path) -> dict[str, object]:
    """Scores of masks with ignored (255) pixels over the pixels they label, plus ``ignored``: the
    fraction of ground-truth-valid pixels they leave out."""
    conf = np.zeros((info.num_labels, info.num_labels), dtype=np.int64)
    ignored = valid = 0
    for image_id in ids:
        gt, mask = info.read_mask(image_id), load_png(mask_dir / f"{image_id}.png")
        conf += confusion_matrix(np.where(mask == IGNORE, IGNORE, gt), mask, info.num_labels, info.ignore)
        ignored += int(((mask == IGNORE) & (gt != IGNORE)).sum())
        valid += int((gt != IGNORE).sum())
    return {**segmentation_scores(conf, info.label_names), "ignored": ignored / max(valid, 1)}


def run(args: argparse.Namespace) -> None:
    if not dist.is_main():
        return
    ids = read_id_list(args.eval_list)
    split = split_name(args.eval_list)
    require_files(args.sem_seg_out_dir, ids, ".png", "make_sem_seg_labels")
    info = dataset.from_args(args)
    (scores,) = evaluate_segmentation(
        info, ids, lambda image_id: load_png(Path(args.sem_seg_out_dir) / f"{image_id}.png"), "eval_sem_seg"
    )
    record(args, {"step": "eval_sem_seg", "split": split, **scores})
    if args.deeplab_ignore_uncertain:
        require_files(args.sem_seg_ignore_dir, ids, ".png", "make_sem_seg_labels")
        scores = labelled_pixel_scores(info, ids, Path(args.sem_seg_ignore_dir))
        record(args, {"step": "eval_sem_seg", "split": split, "postprocess": "ignore_uncertain", **scores})
