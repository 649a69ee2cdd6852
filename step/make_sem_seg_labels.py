"""Semantic pseudo masks: random walk of the stride-4 CAMs over IRN's boundary map (spec 8.2-8.3).

The walk applies the local transition 2^exp_times times to the CAM vectors (misc.indexing.random_walk)
instead of squaring a dense (hw x hw) matrix: same result, O(hw) memory.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

import dataset
from methods.irn import propagate, pseudo_label_inputs
from misc.io import save_png
from misc.labels import ignore_uncertain_background, scores_to_label
from misc.thresholds import thresholds

log = logging.getLogger("wsss")


def run(args: argparse.Namespace) -> None:
    values = thresholds(args)
    bg, confident_bg = values["sem_seg_bg_thres"], values["conf_bg_thres"]
    outputs: dict[str, dict[str, object]] = {args.sem_seg_out_dir: {"bg": bg}}
    if args.deeplab_ignore_uncertain:
        outputs[args.sem_seg_ignore_dir] = {"bg": bg, "confident_bg": confident_bg}
    palette = dataset.from_args(args).palette
    inputs = pseudo_label_inputs(args, args.infer_list, outputs, ".png", "make_sem_seg_labels")
    for image_id, out_dirs, img, edge, _, cams in inputs:
        if len(cams["keys"]) == 0:
            for out_dir in out_dirs:
                save_png(out_dir / f"{image_id}.png", np.zeros(img.shape[:2], np.uint8), palette)
            continue
        rw = propagate(torch.from_numpy(cams["cam"]).to(edge.device), edge, img.shape[:2], args).cpu().numpy()
        label = scores_to_label(rw, cams["keys"], bg)
        save_png(out_dirs[0] / f"{image_id}.png", label, palette)
        if len(out_dirs) > 1:
            save_png(out_dirs[1] / f"{image_id}.png", ignore_uncertain_background(label, rw, confident_bg), palette)
