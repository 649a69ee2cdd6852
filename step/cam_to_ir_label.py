"""Confident foreground/background seeds from the high-resolution CAMs, by the refiner's rule (IRN: spec 6;
AffinityNet: seam_affinitynet spec 3.4).

The dense CRF is CPU work (two CRFs per image), so it runs in a pool of ``num_workers`` processes,
each rank taking its share of the list; per-image PNGs make the step resumable.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

import dataset
import methods
from dataset.base import read_id_list
from misc.io import load_cam, save_png
from misc.pipeline import dir_fingerprint, fingerprint, map_images, pending, prepare_output_dir, require_files

log = logging.getLogger("wsss")


def _make_ir_label(image_id: str, *, dataset_name: str, root: str, max_side: int | None, cam_dir: str, out_dir: str,
                   rule: Callable[..., np.ndarray], settings: dict[str, float]) -> str:
    info = dataset.get_dataset(dataset_name, root, max_side)
    cams = load_cam(Path(cam_dir) / f"{image_id}.npz")
    label = rule(info.read_photo(image_id), cams["high_res"], cams["keys"], **settings)
    save_png(Path(out_dir) / f"{image_id}.png", label, info.palette)
    return image_id


def run(args: argparse.Namespace) -> None:
    ids = read_id_list(args.train_list)
    require_files(args.cam_out_dir, ids, ".npz", "make_cam")
    rule, settings = methods.refiner(args).seed_rule(args)
    fp = fingerprint(cams=dir_fingerprint(args.cam_out_dir, "make_cam"), rule=rule.__name__, **settings)
    out_dir = prepare_output_dir(args.ir_label_out_dir, fp, "*.png")
    todo = pending(ids, out_dir, ".png")
    log.info("cam_to_ir_label: %s %s", rule.__name__, settings)
    job = partial(_make_ir_label, dataset_name=args.dataset, root=args.data_root, max_side=args.max_image_side,
                  cam_dir=args.cam_out_dir, out_dir=str(out_dir), rule=rule, settings=settings)
    map_images(job, todo, "cam_to_ir_label", args.num_workers)
