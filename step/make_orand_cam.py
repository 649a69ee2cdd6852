"""ORANDNet inference (orandnet spec 6.3): the ORAND CAM of every training image into the round's CAM store.

``m_c = relu(FCN(OR_c))`` divided by its max (+1e-5), per class of the image's OR store file, written with
``misc.io.save_cam`` to ``<round>/cam/<id>.npz`` (``high_res`` = m at H x W, ``cam`` its bilinear stride-4
resize, the keys in the OR file's order), where eval_cam and the refiner read a CAM method's output.
Resumes per image; new FCN weights clear the stale CAMs first.
"""

from __future__ import annotations

import argparse
import logging

import torch
from tqdm import tqdm

from dataset.base import read_id_list
from methods.orand import build_orandnet, orand_cam, orand_paths
from misc import dist
from misc.errors import UserError
from misc.io import load_cam, save_cam
from misc.pipeline import (
    dir_fingerprint,
    fingerprint,
    pending,
    prepare_output_dir,
    require_files,
    weights_fingerprint,
)

log = logging.getLogger("wsss")


def run(args: argparse.Namespace) -> None:
    device = dist.init(args.device)
    paths = orand_paths(args)
    weights = paths["weights"]
    if not weights.is_file():
        raise UserError(f"ORANDNet weights {weights} are missing: run train_orandnet first "
                        "(--train_orandnet_pass true).")
    model = build_orandnet(args, pretrained=False)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.to(device).eval()
    fp = fingerprint(weights=weights_fingerprint(weights), or_cams=dir_fingerprint(paths["or"], "combine_cams"),
                     method="orand", activation="sigmoid" if args.orandnet_loss == "bce" else "relu")
    out_dir = prepare_output_dir(args.cam_out_dir, fp, "*.npz")
    ids = read_id_list(args.train_list)
    require_files(paths["or"], ids, ".npz", "combine_cams")
    todo = pending(ids, out_dir, ".npz")
    for image_id in tqdm(todo, desc="make_orand_cam", disable=not dist.is_main(), mininterval=2):
        cams = load_cam(paths["or"] / f"{image_id}.npz")
        cam, high = orand_cam(model, torch.from_numpy(cams["high_res"]).to(device), args.orandnet_loss)
        save_cam(out_dir / f"{image_id}.npz", cams["keys"], cam.cpu().numpy(), high.cpu().numpy())
    log.info("make_orand_cam: %d ORAND CAMs -> %s", len(todo), out_dir)
