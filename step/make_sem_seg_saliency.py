"""Semantic pseudo masks by RCA's fusion of the CAMs with saliency maps and a dense CRF (rca spec 9).

For every image of ``infer_list``: its CAM file's full-resolution maps, its saliency map (``--saliency_dir``;
with ``--saliency_model`` predicted here first, with ``--saliency_gt`` derived from the ground truth here
first: ``methods.saliency``) and the photo go through
``methods.saliency.saliency_label`` into ``<sem_seg_out_dir>/<id>.png`` (0 background, ``c + 1``, 255
ignore). With ``--deeplab_ignore_uncertain`` the same masks also go to ``sem_seg_ignore_dir``, which DeepLab
then reads: they already leave their uncertain pixels (conflicts, salient but unclaimed) unlabelled. The CRF
is CPU work, so it runs in a pool of ``num_workers`` processes, each rank taking its share of the list.
"""

from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path

import dataset
from dataset.base import read_id_list
from methods.saliency import FUSION, gt_saliency, predict_maps, read_saliency, saliency_dir, saliency_label
from misc import dist
from misc.io import files_fingerprint, load_cam, save_png
from misc.pipeline import dir_fingerprint, fingerprint, map_images, pending, prepare_outputs, require_files

log = logging.getLogger("wsss")


def _fuse(image_id: str, *, dataset_name: str, root: str, max_side: int | None, cam_dir: str, sal_dir: str,
          out_dirs: list[str]) -> str:
    info = dataset.get_dataset(dataset_name, root, max_side)
    img = info.read_photo(image_id)
    cams = load_cam(Path(cam_dir) / f"{image_id}.npz")
    saliency = read_saliency(Path(sal_dir) / f"{image_id}.png", img.shape[:2])
    label = saliency_label(img, cams["high_res"], cams["keys"], saliency, **FUSION)
    for out_dir in out_dirs:
        save_png(Path(out_dir) / f"{image_id}.png", label, info.palette)
    return image_id


def run(args: argparse.Namespace) -> None:
    ids = read_id_list(args.infer_list)
    require_files(args.cam_out_dir, ids, ".npz", "make_cam")
    info = dataset.from_args(args)
    sal_dir = saliency_dir(args)
    if args.saliency_gt:
        for image_id in pending(ids, sal_dir, ".png"):
            save_png(sal_dir / f"{image_id}.png", gt_saliency(info, image_id))
        dist.barrier()
    elif args.saliency_model:
        predict_maps(args.saliency_model, info, dist.shard(ids), sal_dir, dist.init(args.device))
        dist.barrier()
    require_files(sal_dir, ids, ".png", "the saliency model",
                  "put one saliency map per image there (<id>.png, grey 0-255), or pass --saliency_gt true for the "
                  "ground-truth upper bound")
    saliency = files_fingerprint((i, sal_dir / f"{i}.png") for i in ids)
    fp = fingerprint(cams=dir_fingerprint(args.cam_out_dir, "make_cam"), saliency=saliency,
                     fusion=FUSION)
    outputs: dict[str, dict[str, object]] = {args.sem_seg_out_dir: {}}
    if args.deeplab_ignore_uncertain:
        outputs[args.sem_seg_ignore_dir] = {}
    dirs, todo = prepare_outputs(ids, outputs, fp, ".png")
    log.info("make_sem_seg_saliency: saliency from %s%s", sal_dir, " (ground truth: upper bound)" if args.saliency_gt
             else "")
    job = partial(_fuse, dataset_name=args.dataset, root=args.data_root, max_side=args.max_image_side,
                  cam_dir=args.cam_out_dir, sal_dir=str(sal_dir), out_dirs=[str(d) for d in dirs])
    map_images(job, todo, "make_sem_seg_saliency", args.num_workers)
