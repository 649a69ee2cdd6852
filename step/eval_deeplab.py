"""Evaluate the trained segmenter (DeepLab) on the val list, optionally export the VOC test-server submission.

Inference per image: for every scale of ``args.deeplab_eval_scales`` the image and its mirror go through
the network as one batch of two; the softmax probabilities, resized to the image, are averaged over scales
and flips (``msf``). With ``args.deeplab_crf`` the averaged probabilities are also refined by the dense CRF
of spec 11.2 (``msf+crf``), from the same inference: both rows are recorded. Predictions are palette PNGs;
a re-run skips images already predicted with the same weights and settings (the output folders are
fingerprinted). Images are sharded over DDP ranks and the confusion
matrices summed.
"""

from __future__ import annotations

import argparse
import logging
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import dataset
import methods
from dataset.base import DatasetInfo, read_id_list
from dataset.samples import ImageDataset, single_collate
from misc import dist
from misc.crf import crf_inference_prob
from misc.errors import UserError
from misc.imutils import hwc_to_chw, normalize, scaled_size
from misc.io import atomic_write, load_png, save_png
from misc.metrics import segmentation_scores
from misc.pipeline import (
    autocast,
    file_fingerprint,
    fingerprint,
    gt_confusions,
    prepare_output_dir,
    record,
    require_gt,
    split_name,
)
from net.backbone import load_state, read_checkpoint

log = logging.getLogger("wsss")

SUBMISSION_DIR = "results/VOC2012/Segmentation/comp6_test_cls"


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module, img: np.ndarray, scales: Sequence[float], device: torch.device, amp: bool = False
) -> np.ndarray:
    """Multi-scale + flip class probabilities of one uint8 ``(H, W, 3)`` image -> float32 ``(C, H, W)``.

    The normalised image is resized on the device (bilinear), each scale forwards ``[x, flip(x)]`` as one
    batch, the logits are resized to ``(H, W)`` and the softmax probabilities averaged over all passes.
    """
    h, w = img.shape[:2]
    x = torch.from_numpy(hwc_to_chw(normalize(img)))[None].to(device)
    total = torch.zeros((), device=device)
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, size=scaled_size((h, w), s), mode="bilinear", align_corners=False)
        with autocast(device, amp):
            logits = model(torch.cat([xs, xs.flip(-1)]), upsample=False)
        probs = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False).softmax(1)
        total = total + probs[0] + probs[1].flip(-1)
    return (total / (2 * len(scales))).cpu().numpy()


def load_model(args: argparse.Namespace, info: DatasetInfo, device: torch.device) -> tuple[torch.nn.Module, Path]:
    """The trained segmenter of ``<args.deeplab_dir>/deeplab.pth`` in eval mode, and that path."""
    path = Path(args.deeplab_dir) / "deeplab.pth"
    if not path.is_file():
        raise UserError(f"DeepLab weights {path} are missing: run train_deeplab first (--train_deeplab_pass true).")
    # Random backbone init: every weight comes from the file.
    model = methods.segmenter(args).build(args, info.num_labels, None)
    load_state(model, read_checkpoint(path), source=str(path), ignore_prefixes=())
    return model.to(device).eval(), path


def predict_ids(
    args: argparse.Namespace, info: DatasetInfo, model: torch.nn.Module, device: torch.device, ids: list[str],
    out_dirs: dict[str, Path], desc: str,
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Yield ``(id, {postprocess: (H, W) uint8 prediction})`` for this rank's share of ``ids``.

    ``out_dirs`` maps ``"msf"`` and / or ``"msf+crf"`` to their folders: one multi-scale inference feeds both
    (the CRF refines the same averaged probabilities). Predictions already in every folder are read back;
    the others are inferred and saved as palette PNGs (values ``0..info.num_labels-1``).
    """
    todo = []
    for i in dist.shard(ids):
        if all((d / f"{i}.png").is_file() for d in out_dirs.values()):
            yield i, {post: load_png(d / f"{i}.png") for post, d in out_dirs.items()}
        else:
            todo.append(i)
    loader = DataLoader(ImageDataset(info, todo), batch_size=1, num_workers=args.num_workers,
                        collate_fn=single_collate)
    for item in tqdm(loader, desc=desc, disable=not dist.is_main(), mininterval=2):
        probs = predict_probs(model, item["img"], args.deeplab_eval_scales, device, args.amp)
        preds = {}
        for post, out_dir in out_dirs.items():
            refined = crf_inference_prob(item["img"], probs) if post == "msf+crf" else probs
            preds[post] = refined.argmax(0).astype(np.uint8)
            save_png(out_dir / f"{item['name']}.png", preds[post], info.palette)
        yield item["name"], preds


def _labels(args: argparse.Namespace) -> str:
    """What the segmenter learnt from, for the metrics row: ``gt``, ``pseudo`` (the rounds' masks), or the
    sparse supervision itself (``points`` / ``scribbles``)."""
    if args.deeplab_gt:
        return "gt"
    supervision = getattr(args, "supervision", "tags")
    return "pseudo" if supervision == "tags" else supervision


def postprocess_fingerprint(args: argparse.Namespace, weights: Path, postprocess: str) -> str:
    """What a prediction folder's files depend on: the weights, the inference settings and the CRF."""
    return fingerprint(weights=file_fingerprint(weights), scales=[float(s) for s in args.deeplab_eval_scales],
                       crf=postprocess == "msf+crf", arch=args.deeplab_arch, backbone=args.deeplab_backbone,
                       os=args.deeplab_output_stride)


def run(args: argparse.Namespace) -> None:
    device = dist.init(args.device)
    info = dataset.from_args(args)
    model, weights = load_model(args, info, device)
    # The raw multi-scale score always, and the CRF's beside it when asked: the CRF's gain is part of the result.
    postprocesses = ["msf", "msf+crf"] if args.deeplab_crf else ["msf"]

    split = split_name(args.val_list)
    ids = read_id_list(args.val_list)
    require_gt(info, ids)
    out_dirs = {post: prepare_output_dir(Path(args.deeplab_dir) / f"pred_{split}{'_crf' if post == 'msf+crf' else ''}",
                                         postprocess_fingerprint(args, weights, post), "*.png")
                for post in postprocesses}
    conf = {post: np.zeros((info.num_labels, info.num_labels), dtype=np.int64) for post in postprocesses}
    for image_id, preds in predict_ids(args, info, model, device, ids, out_dirs, f"eval_deeplab {split}"):
        for post, c in zip(postprocesses, gt_confusions(info, image_id, [preds[p] for p in postprocesses]),
                           strict=True):
            conf[post] += c
    for post in postprocesses:
        if dist.world_size() > 1:
            total = torch.from_numpy(conf[post]).to(device)
            torch_dist.all_reduce(total)
            conf[post] = total.cpu().numpy()
        scores = segmentation_scores(conf[post], info.label_names)
        record(args, {"step": "eval_deeplab", "split": split, "postprocess": post,
                      "scales": [float(s) for s in args.deeplab_eval_scales], "arch": args.deeplab_arch,
                      "backbone": args.deeplab_backbone, "labels": _labels(args), **scores})

    if args.make_test_submission:
        export_submission(args, info, model, device, postprocesses[-1], weights)


def export_submission(args: argparse.Namespace, info: DatasetInfo, model: torch.nn.Module, device: torch.device,
                      postprocess: str, weights: Path) -> None:
    """Test predictions in the VOC evaluation-server layout, plus ``submission/results.tgz`` to upload."""
    ids = read_id_list(args.test_list)
    missing = [i for i in ids if not info.image(i).is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(ids)} test images are missing (first: {info.image(missing[0])}): add the test "
            "images to the dataset (VOC: the VOC2012 test package), or pass --make_test_submission false."
        )
    root = Path(args.deeplab_dir) / "submission"
    out_dir = prepare_output_dir(root / SUBMISSION_DIR, postprocess_fingerprint(args, weights, postprocess), "*.png")
    for _ in predict_ids(args, info, model, device, ids, {postprocess: out_dir}, "eval_deeplab test"):
        pass
    dist.barrier()
    if dist.is_main():
        tgz = root / "results.tgz"
        with atomic_write(tgz) as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
            for i in ids:
                tar.add(out_dir / f"{i}.png", arcname=f"{SUBMISSION_DIR}/{i}.png")
        log.info("eval_deeplab: %d test predictions in %s; upload %s to the VOC evaluation server", len(ids),
                 out_dir, tgz)
