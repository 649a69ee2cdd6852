"""Confident foreground/background seeds for IRN from the high-resolution CAMs (spec 6).

The dense CRF is CPU work (two CRFs per image), so it runs in a pool of ``num_workers`` processes,
each rank taking its share of the list; per-image PNGs make the step resumable.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
from functools import partial
from pathlib import Path

from tqdm import tqdm

import dataset
from dataset.base import read_id_list
from misc import dist
from misc.crf import ir_label_from_cam
from misc.io import load_cam, save_png
from misc.pipeline import dir_fingerprint, fingerprint, pending, prepare_output_dir, require_files
from misc.thresholds import thresholds

log = logging.getLogger("wsss")


def _make_ir_label(image_id: str, *, dataset_name: str, root: str, max_side: int | None, cam_dir: str, out_dir: str,
                   fg: float, bg: float) -> str:
    info = dataset.get_dataset(dataset_name, root, max_side)
    cams = load_cam(Path(cam_dir) / f"{image_id}.npz")
    label = ir_label_from_cam(info.read_photo(image_id), cams["high_res"], cams["keys"], fg, bg)
    save_png(Path(out_dir) / f"{image_id}.png", label, info.palette)
    return image_id


def run(args: argparse.Namespace) -> None:
    ids = read_id_list(args.train_list)
    require_files(args.cam_out_dir, ids, ".npz", "make_cam")
    values = thresholds(args)
    fg, bg = values["conf_fg_thres"], values["conf_bg_thres"]
    fp = fingerprint(cams=dir_fingerprint(args.cam_out_dir, "make_cam"), fg=fg, bg=bg)
    out_dir = prepare_output_dir(args.ir_label_out_dir, fp, "*.png")
    todo = pending(ids, out_dir, ".png")
    job = partial(_make_ir_label, dataset_name=args.dataset, root=args.data_root, max_side=args.max_image_side,
                  cam_dir=args.cam_out_dir,
                  out_dir=str(out_dir), fg=fg, bg=bg)
    bar = tqdm(total=len(todo), desc="cam_to_ir_label", disable=not dist.is_main(), mininterval=2)
    if args.num_workers <= 1:
        for image_id in todo:
            job(image_id)
            bar.update()
    else:
        # spawn, not fork: forking a process that already runs torch's thread pools can deadlock.
        with mp.get_context("spawn").Pool(args.num_workers) as pool:
            for _ in pool.imap_unordered(job, todo, chunksize=4):
                bar.update()
    bar.close()
