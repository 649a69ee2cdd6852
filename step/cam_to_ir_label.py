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

from misc import dist
from misc.crf import ir_label_from_cam
from misc.io import load_cam, save_png
from misc.pipeline import dir_fingerprint, fingerprint, pending, prepare_output_dir, require_files
from voc12.dataset import VOCLayout, read_id_list, read_image

log = logging.getLogger("wsss")


def _make_ir_label(image_id: str, *, voc12_root: str, cam_dir: str, out_dir: str, fg: float, bg: float) -> str:
    img = read_image(VOCLayout(voc12_root).image(image_id))
    cams = load_cam(Path(cam_dir) / f"{image_id}.npz")
    save_png(Path(out_dir) / f"{image_id}.png", ir_label_from_cam(img, cams["high_res"], cams["keys"], fg, bg))
    return image_id


def run(args: argparse.Namespace) -> None:
    ids = read_id_list(args.train_list)
    require_files(args.cam_out_dir, ids, ".npz", "make_cam")
    fp = fingerprint(cams=dir_fingerprint(args.cam_out_dir, "make_cam"), fg=args.conf_fg_thres, bg=args.conf_bg_thres)
    out_dir = prepare_output_dir(args.ir_label_out_dir, fp, ".png")
    todo = pending(ids, out_dir, ".png")
    job = partial(_make_ir_label, voc12_root=args.voc12_root, cam_dir=args.cam_out_dir, out_dir=str(out_dir),
                  fg=args.conf_fg_thres, bg=args.conf_bg_thres)
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
