"""ORANDNet's OR / AND stores (orandnet spec 5) of the two ``--orand_sources`` stores, for the training list.

Writes ``<round>/orand/or/<id>.npz`` and ``<round>/orand/and/<id>.npz`` (``misc.io.save_cam``; the maps
unclipped and not re-normalised, ``misc.cam_store``). The classes combined are the image's label; a source
lacking one of them, or lacking the image, is an error naming its file. Resumes per image; new sources or
another offset clear the stale outputs first.
"""

from __future__ import annotations

import argparse
import logging

import dataset
from dataset.base import read_id_list
from dataset.labels import load_cls_labels
from methods.orand import orand_paths
from misc.cam_store import combine_stores, store_fingerprint
from misc.pipeline import content_fingerprint, fingerprint, prepare_outputs

log = logging.getLogger("wsss")


def run(args: argparse.Namespace) -> None:
    info = dataset.from_args(args)
    ids = read_id_list(args.train_list)
    labels = load_cls_labels(args.cls_labels, info.num_classes)
    paths = orand_paths(args)
    dir_a, dir_b = args.orand_sources
    base = fingerprint(a=store_fingerprint(dir_a), b=store_fingerprint(dir_b), offset=args.orand_offset,
                       labels=content_fingerprint(args.cls_labels))
    (or_dir, and_dir), todo = prepare_outputs(ids, {paths["or"]: {"op": "or"}, paths["and"]: {"op": "and"}},
                                              base, ".npz")
    written = combine_stores(dir_a, dir_b, todo, or_dir, and_dir, args.orand_offset, labels)
    log.info("combine_cams: %d images of %s and %s -> %s, %s", written, dir_a, dir_b, or_dir, and_dir)
