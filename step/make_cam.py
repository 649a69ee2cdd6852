"""Multi-scale + flip CAM inference over the training list (spec 4), sharded across ranks, resumable.

Writes ``<cam_out_dir>/<id>.npz`` (``misc.io.save_cam``): the image's classes, the stride-4 CAM used by
the random walk and the full-resolution CAM used by evaluation and IR labels, both max-normalised.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import dataset
import methods
from dataset.base import read_id_list
from dataset.labels import load_cls_labels
from dataset.samples import ImageDataset
from methods.base import CAMMethod
from misc import dist
from misc.cam_store import normalise, strided_size
from misc.convert import load_weights
from misc.imutils import hwc_to_chw, normalize, rescale
from misc.io import save_cam
from misc.pipeline import autocast, fingerprint, pending, prepare_output_dir, weights_fingerprint

log = logging.getLogger("wsss")


class MultiScaleDataset(Dataset):
    """Per image: its label and one (2, 3, h_s, w_s) [image, h-flipped image] tensor per scale.

    Resizing (PIL bicubic on uint8, as the reference) happens in loader workers, off the device's path.
    ``flip=False``: the tensors hold the image alone, ``(1, 3, h_s, w_s)`` (a method without flip fusion).
    ``max_side``: an image whose largest scale would exceed this long side is first scaled down so that it
    does not (every scale by the same factor), which bounds the network's memory on huge photos; the CAMs
    are still written at the image's full size.
    """

    def __init__(self, images: ImageDataset, scales: Sequence[float], max_side: int | None = None,
                 flip: bool = True) -> None:
        self.images = images
        self.scales = tuple(scales)
        self.max_side = max_side
        self.flip = flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        item = self.images[index]
        img = item["img"]
        pairs = []
        factor = 1.0
        if self.max_side is not None:
            factor = min(1.0, self.max_side / (max(img.shape[:2]) * max(self.scales)))
        for s in self.scales:
            x = torch.from_numpy(hwc_to_chw(normalize(rescale(img, s * factor, order=3))))
            pairs.append(torch.stack([x, x.flip(-1)]) if self.flip else x[None])
        return {"name": item["name"], "label": item["label"], "size": img.shape[:2], "pairs": pairs}


@torch.no_grad()
def multiscale_cam(
    method: CAMMethod, model: torch.nn.Module, pairs: list[torch.Tensor], size: tuple[int, int], keys: torch.Tensor,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse flip-summed CAMs over scales (spec 4 steps 1-6).

    pairs: per scale a (2, 3, h_s, w_s) [image, flipped] batch on the model's device (a method that is not
    ``multi_scale``: one (1, 3, H, W) image); keys: (k,) classes.
    Returns (cam (k, H4, W4), high_res (k, H, W)), float32, each class normalised to a max of 1 (``normalise``).
    """
    h, w = size
    strided = strided_size(h, w)
    if len(keys) == 0:  # an image without a labelled class (an empty tag set) has no CAM to compute
        device = pairs[0].device
        return torch.zeros((0, *strided), device=device), torch.zeros((0, h, w), device=device)
    padded16 = tuple(((d - 1) // 16 + 1) * 16 for d in (h, w))
    cam = high_res = 0
    for x in pairs:
        with autocast(x.device, amp):
            maps = method.cams(model, x, keys) if method.per_class else method.cams(model, x)
        # Sum (not mean) of the image and its flipped twin, as the reference; the max-normalisation
        # below removes the scale anyway. Only the image's classes are needed from here on.
        fused = (maps[0] + maps[1].flip(-1) if len(maps) == 2 else maps[0])[keys].float().unsqueeze(0)
        cam = cam + F.interpolate(fused, strided, mode="bilinear", align_corners=False)[0]
        if method.multi_scale:
            # Resized to the 16-multiple size then cropped, not resized to (H, W): keeps the reference alignment.
            high_res = high_res + F.interpolate(fused, padded16, mode="bilinear", align_corners=False)[0, :, :h, :w]
        else:  # maps of the whole (resized) image, as ViT relevance: stretched onto it
            high_res = high_res + F.interpolate(fused, (h, w), mode="bilinear", align_corners=False)[0]
    return normalise(cam, method.subtract_min), normalise(high_res, method.subtract_min)


def load_cam_net(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The trained CAM network of this round (or ``--cam_weights``), in eval mode."""
    model = methods.cam_method(args).build(args, dataset.from_args(args).num_classes)
    load_weights(model, args.cam_weights or args.cam_weights_name, "cam")
    return model.to(device).eval()


def run(args: argparse.Namespace) -> None:
    device = dist.init(args.device)
    weights = args.cam_weights or args.cam_weights_name
    info = dataset.from_args(args)
    labels = load_cls_labels(args.cls_labels, info.num_classes)
    # The weights are loaded (and checked) before a stale CAM is deleted.
    model = load_cam_net(args, device)
    method = methods.cam_method(args)
    # A method's map settings join the fingerprint only when it has some, so other methods' stores stay valid.
    extra = {"cam_settings": {k: getattr(args, k) for k in method.cam_settings}} if method.cam_settings else {}
    scales = args.cam_scales if method.multi_scale else (1.0,)
    fp = fingerprint(weights=weights_fingerprint(weights), scales=scales, method=args.cam_method,
                     max_side=args.cam_max_side, max_image_side=args.max_image_side, **extra)
    out_dir = prepare_output_dir(args.cam_out_dir, fp, "*.npz")
    todo = pending(read_id_list(args.train_list), out_dir, ".npz")
    if not todo:
        log.info("make_cam: all CAMs already in %s", out_dir)
        return
    images = ImageDataset(info, todo, labels)
    loader = DataLoader(
        MultiScaleDataset(images, scales, args.cam_max_side, flip=method.multi_scale),
        batch_size=None,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    for item in tqdm(loader, desc="make_cam", disable=not dist.is_main(), mininterval=2):
        keys = torch.nonzero(torch.as_tensor(item["label"]))[:, 0]
        pairs = [p.to(device, non_blocking=True) for p in item["pairs"]]
        cam, high_res = multiscale_cam(method, model, pairs, tuple(item["size"]), keys.to(device), args.amp)
        save_cam(out_dir / f"{item['name']}.npz", keys.numpy(), cam.cpu().numpy(), high_res.cpu().numpy())
