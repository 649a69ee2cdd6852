"""Instance pseudo labels (spec 8.4): displacement field -> instance centroids -> per-instance random walk.

Writes ``<ins_seg_out_dir>/<id>.npz`` with ``score`` (M,), ``class`` (M,) 0-based, ``mask_bits`` (the
(M, H, W) bool masks, bit-packed) and ``shape`` (H, W); ``eval_ins_seg.load_detections`` reads it back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from methods.irn import propagate, pseudo_label_inputs
from misc.instances import cluster_centroids, detections_from_maps, find_centroids, to_one_hot
from misc.io import atomic_write
from misc.thresholds import thresholds


def save_detections(path: Path, detections: dict[str, np.ndarray], shape: tuple[int, int]) -> None:
    with atomic_write(path) as f:
        np.savez_compressed(f, score=detections["score"], **{"class": detections["class"]},
                            mask_bits=np.packbits(detections["mask"].reshape(-1)), shape=np.asarray(shape))


def run(args: argparse.Namespace) -> None:
    bg = thresholds(args)["ins_seg_bg_thres"]
    inputs = pseudo_label_inputs(args, args.ins_seg_list, {args.ins_seg_out_dir: {"bg": bg}}, ".npz",
                                 "make_ins_seg_labels")
    for image_id, (out_dir,), img, edge, displacement, cams in inputs:
        disp = displacement.cpu().numpy()
        instances = to_one_hot(cluster_centroids(disp, find_centroids(disp)))  # (N, h4, w4)
        n_clusters = len(instances)
        # One map per (class, instance): the class CAM restricted to that instance's pixels.
        cam = torch.from_numpy(cams["cam"]).to(edge.device)
        maps = (cam[:, None] * torch.from_numpy(instances).to(edge.device)[None]).flatten(0, 1)
        if len(maps) == 0:
            detections = detections_from_maps(np.zeros((0, *img.shape[:2]), np.float32), cams["keys"], n_clusters)
        else:
            rw = propagate(maps, edge, img.shape[:2], args).cpu().numpy()
            detections = detections_from_maps(rw, cams["keys"], n_clusters, bg)
        save_detections(out_dir / f"{image_id}.npz", detections, img.shape[:2])
