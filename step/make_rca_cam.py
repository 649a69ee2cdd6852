"""RCA's CAMs: the maps it accumulated during training (rca spec 8), written as the standard CAM files.

Reads the accumulated maps out of the RCA weights (``--cam_weights``, else train_cam's), one ``(h, w)`` map per
(image, labelled class) of the training list at 1/8 of the square training input, and writes
``<cam_out_dir>/<id>.npz`` (``misc.io.save_cam``): each map resized bilinearly to the stride-4 and the full
size of the image (the square input covered the whole image) and divided by its max. ``eval_cam`` and the
refiners read them like any CAM method's. Sharded across ranks, resumable per image.
"""

from __future__ import annotations

import argparse
import logging

from tqdm import tqdm

import dataset
from dataset.base import read_id_list
from methods.rca import export_maps, load_accumulated
from misc import dist
from misc.io import save_cam
from misc.pipeline import fingerprint, pending, prepare_output_dir, trained_weights, weights_fingerprint

log = logging.getLogger("wsss")


def run(args: argparse.Namespace) -> None:
    dist.init(args.device)
    weights = trained_weights(args.cam_weights, args.cam_weights_name, "train_cam", "--cam_weights")
    info = dataset.from_args(args)
    # The maps are read (and checked against the list) before a stale CAM is deleted.
    store = load_accumulated(args, weights, info.num_classes)
    fp = fingerprint(weights=weights_fingerprint(weights), method=args.cam_method, max_image_side=args.max_image_side)
    out_dir = prepare_output_dir(args.cam_out_dir, fp, "*.npz")
    todo = pending(read_id_list(args.train_list), out_dir, ".npz")
    log.info("make_rca_cam: %d of %d (image, class) maps accumulated, %d images to write", int(store.stored.sum()),
             len(store.stored), len(todo))
    for image_id in tqdm(todo, desc="make_rca_cam", disable=not dist.is_main(), mininterval=2):
        keys, maps = store.image_maps(image_id)
        cam, high_res = export_maps(maps, info.read_photo(image_id).shape[:2])
        save_cam(out_dir / f"{image_id}.npz", keys.numpy(), cam.numpy(), high_res.numpy())
