"""Semantic pseudo masks by AffinityNet's random walk of the CAMs (seam_affinitynet spec 3.9).

Each image's CAMs, with PSA's background ``(1 - max CAM)^aff_rw_alpha``, are pooled onto the network's
stride-8 grid, walked ``2^aff_logt`` steps under the learnt affinities (``methods.affinitynet.walk_cams``),
upsampled and arg-maxed. With ``--deeplab_ignore_uncertain`` a second folder keeps as background only the
pixels whose best walked class score stays below the background seeds' score (what ``--aff_high_alpha``
makes background), and leaves the rest unlabelled, as IRN's does.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from tqdm import tqdm

import dataset
from dataset.base import read_id_list
from methods.affinitynet import affinity_weights, alphas, build_affinitynet, label_from_walk, walk_cams
from misc import dist
from misc.convert import load_weights
from misc.imutils import hwc_to_chw, normalize
from misc.io import load_cam, save_png
from misc.labels import ignore_uncertain_background
from misc.pipeline import dir_fingerprint, fingerprint, prepare_outputs, require_files, weights_fingerprint
from net.affinitynet import alpha_threshold

log = logging.getLogger("wsss")


def run(args: argparse.Namespace) -> None:
    device = dist.init(args.device)
    ids = read_id_list(args.infer_list)
    require_files(args.cam_out_dir, ids, ".npz", "make_cam")
    weights = affinity_weights(args)
    a = alphas(args)
    confident_bg = alpha_threshold(a["aff_high_alpha"])
    walk = fingerprint(cams=dir_fingerprint(args.cam_out_dir, "make_cam"), affinity=weights_fingerprint(weights),
                       alpha=a["aff_rw_alpha"], beta=args.aff_beta, logt=args.aff_logt)
    outputs: dict[str, dict[str, object]] = {args.sem_seg_out_dir: {}}
    if args.deeplab_ignore_uncertain:
        outputs[args.sem_seg_ignore_dir] = {"confident_bg": confident_bg}
    # The network is loaded (and its weights checked) before any stale output is cleared.
    model = build_affinitynet(args)
    load_weights(model, weights, "affinity")
    model.to(device).eval()
    info = dataset.from_args(args)
    dirs, todo = prepare_outputs(ids, outputs, walk, ".png")
    log.info("make_sem_seg_affinity: alpha %.3g, beta %g, 2^%d steps", a["aff_rw_alpha"], args.aff_beta, args.aff_logt)
    for image_id in tqdm(todo, desc="make_sem_seg_affinity", disable=not dist.is_main(), mininterval=2):
        img = info.read_photo(image_id)
        cams = load_cam(Path(args.cam_out_dir) / f"{image_id}.npz")
        x = torch.from_numpy(hwc_to_chw(normalize(img)))[None].to(device)
        high_res = torch.from_numpy(cams["high_res"]).float().to(device)
        walked = walk_cams(model, x, high_res, a["aff_rw_alpha"], args.aff_beta, args.aff_logt).cpu().numpy()
        label = label_from_walk(walked, cams["keys"])
        save_png(dirs[0] / f"{image_id}.png", label, info.palette)
        if len(dirs) > 1:
            save_png(dirs[1] / f"{image_id}.png", ignore_uncertain_background(label, walked[1:], confident_bg),
                     info.palette)
