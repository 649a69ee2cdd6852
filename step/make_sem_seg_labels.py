"""Semantic pseudo masks: random walk of the stride-4 CAMs over IRN's boundary map (spec 8.2-8.3).

The walk applies the local transition 2^exp_times times to the CAM vectors (misc.indexing.random_walk)
instead of squaring a dense (hw x hw) matrix: same result, O(hw) memory.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from misc import dist
from misc.indexing import random_walk
from misc.io import load_cam, save_png
from misc.labels import ignore_uncertain_background, scores_to_label
from misc.pipeline import (
    dir_fingerprint,
    fingerprint,
    pending,
    prepare_output_dir,
    require_files,
    weights_fingerprint,
)
from step.train_irn import IRNInference, irn_weights
from voc12.dataset import read_id_list

log = logging.getLogger("wsss")


def propagate(cams: torch.Tensor, edge: torch.Tensor, size: tuple[int, int], args: argparse.Namespace) -> torch.Tensor:
    """Random-walk (n, H4, W4) maps over the (H4, W4) boundary map and upsample them to (n, H, W).

    Reference (``args.rw_normalize`` false): the walked maps divided by their max over all maps together
    (not per class), the scale the background threshold 0.25 was tuned on. The walk averages the maps
    weighted by ``1 - B``, so its peaks drop and this division inflates everything: harmless when CAMs are
    ~0 off the objects, but it lifts a CAM that spills onto the context above the threshold.
    ``rw_normalize``: the walked maps divided by the walked ``1 - B`` mass, i.e. the boundary-weighted
    mean of each map over the region the walk reaches. It stays in CAM units, so the CAM's own
    threshold applies to it.
    """
    maps = torch.cat([torch.ones_like(cams[:1]), cams]) if args.rw_normalize else cams
    walked = random_walk(maps, edge, beta=args.beta, exp_times=args.exp_times, radius=5)
    if args.rw_normalize:
        walked = walked[1:] / walked[:1].clamp_min(1e-5)
    h, w = size
    up = F.interpolate(walked[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, :h, :w]
    return up if args.rw_normalize else up / (up.max() + 1e-5)


def pseudo_label_inputs(
    args: argparse.Namespace, list_file: str, outputs: dict[str, dict[str, object]], suffix: str, desc: str
) -> Iterator[tuple[str, list[Path], np.ndarray, torch.Tensor, torch.Tensor, dict[str, np.ndarray]]]:
    """What a pseudo-label step needs per pending image of this rank's share of ``list_file``.

    ``outputs`` maps each output folder to its own settings (thresholds); every folder is stamped with
    those and with the CAMs, IRN weights and random-walk settings it derives from. An image is pending
    while any folder lacks its file. Yields (id, output folders in the order given, uint8 image (H, W, 3),
    edge (H4, W4), displacement (2, H4, W4), CAM file).
    """
    device = dist.init(args.device)
    ids = read_id_list(list_file)
    require_files(args.cam_out_dir, ids, ".npz", "make_cam")
    weights = irn_weights(args)
    walk = fingerprint(cams=dir_fingerprint(args.cam_out_dir, "make_cam"), irn=weights_fingerprint(weights),
                       beta=args.beta, exp_times=args.exp_times, rw_normalize=args.rw_normalize)
    dirs = [prepare_output_dir(d, fingerprint(walk=walk, **settings), suffix) for d, settings in outputs.items()]
    missing = set().union(*(pending(ids, d, suffix) for d in dirs))
    todo = [i for i in ids if i in missing]
    if not todo:
        return
    irn = IRNInference(args, device)
    for image_id in tqdm(todo, desc=desc, disable=not dist.is_main(), mininterval=2):
        img, edge, displacement = irn(image_id)
        yield image_id, dirs, img, edge, displacement, load_cam(Path(args.cam_out_dir) / f"{image_id}.npz")


def run(args: argparse.Namespace) -> None:
    outputs: dict[str, dict[str, object]] = {args.sem_seg_out_dir: {"bg": args.sem_seg_bg_thres}}
    if args.deeplab_ignore_uncertain:
        outputs[args.sem_seg_ignore_dir] = {"bg": args.sem_seg_bg_thres, "confident_bg": args.conf_bg_thres}
    inputs = pseudo_label_inputs(args, args.infer_list, outputs, ".png", "make_sem_seg_labels")
    for image_id, out_dirs, img, edge, _, cams in inputs:
        if len(cams["keys"]) == 0:
            for out_dir in out_dirs:
                save_png(out_dir / f"{image_id}.png", np.zeros(img.shape[:2], np.uint8))
            continue
        rw = propagate(torch.from_numpy(cams["cam"]).to(edge.device), edge, img.shape[:2], args).cpu().numpy()
        label = scores_to_label(rw, cams["keys"], args.sem_seg_bg_thres)
        save_png(out_dirs[0] / f"{image_id}.png", label)
        if len(out_dirs) > 1:
            save_png(out_dirs[1] / f"{image_id}.png", ignore_uncertain_background(label, rw, args.conf_bg_thres))
