"""Step: image-level labels for every id of the lists, shipped or derived from the dataset (spec 1.3)."""

from __future__ import annotations

import argparse

import dataset
from dataset.base import read_id_list
from dataset.labels import resolve_labels
from misc import dist


def run(args: argparse.Namespace) -> None:
    """Write ``args.cls_labels`` with the labels of all ids in the train/val/infer/eval lists."""
    # Only rank 0 writes the shared file; the others wait for it (no-op without torchrun).
    if dist.is_main():
        ids: list[str] = []
        for path in (args.train_list, args.val_list, args.infer_list, args.eval_list):
            ids += read_id_list(path)
        labels = resolve_labels(dataset.from_args(args), ids, args.cls_labels)
        per_image = sum(float(y.sum()) for y in labels.values()) / max(1, len(labels))
        print(f"make_cls_labels: {len(labels)} images, {per_image:.2f} classes/image -> {args.cls_labels}")
    dist.barrier()
