"""The benchmarks: each times the core computation of a step, and where the pipeline replaced a
reference-style formulation, that formulation too, so that every speed-up is a ratio from one run.

Inputs are synthetic (smooth noise plus a sharp-edged ellipse, so the CRF has edges to follow) and the
networks are randomly initialised: the time of a forward pass does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.measure import Measurement, Meter
from dataset.voc12 import VOC12
from methods.cam import PlainCAM
from methods.deeplab import DeepLabSegmenter
from methods.irn import TRAIN_RADIUS, propagate
from methods.irn import batch_losses as irn_batch_losses
from misc.crf import ir_label_from_cam
from misc.imutils import hwc_to_chw, normalize, rescale
from misc.indexing import get_path_index, random_walk, random_walk_dense
from misc.labels import scores_to_label
from misc.optim import PolyOptimizer
from misc.pipeline import autocast
from net.cam import CAMNet
from net.deeplab import build_deeplab
from net.factory import build_backbone
from net.irn import IRN, edge_and_displacement
from step.make_cam import MultiScaleDataset, multiscale_cam, strided_size

# Random-walk settings of the pipeline (run_sample defaults, spec 8.2).
BETA, EXP_TIMES, RW_RADIUS = 10, 8, 5
# On CPU the dense walk runs in full only up to this many grid pixels: at the VOC grid (11,750) each of
# its 8 squarings is a ~3 TFLOP matmul, minutes on a small CPU. Beyond it the time is extrapolated.
DENSE_FULL_MAX_PIXELS = 4096
CPU_TRAIN_BATCH = 2  # on CPU the training steps use this batch instead of the preset's (GPU-sized) one
CRF_IMAGES = 2  # per timed call: one per worker of the 2-process pool
KEYS = np.array([2, 11])  # the classes present in the synthetic image
NUM_CLASSES = len(VOC12.class_names)  # the benchmarks time VOC-sized heads


@dataclass(frozen=True)
class Profile:
    """One input size with the preset that belongs to it (``run_sample.PRESETS``)."""

    name: str  # "demo" or "voc"
    size: tuple[int, int]  # (H, W) of the inference images
    preset: dict
    crop: int | None = None  # training crop override (--quick); None: the preset's crops


@dataclass
class Context:
    """What every benchmark needs: the device, the timer and whether forwards run under bf16 autocast."""

    device: torch.device
    meter: Meter
    amp: bool  # bf16 autocast for the forwards that run under autocast in the steps (CUDA only)

    def batch(self, preset_batch: int) -> int:
        """Training batch: the preset's on CUDA, at most ``CPU_TRAIN_BATCH`` on CPU."""
        return preset_batch if self.device.type == "cuda" else min(preset_batch, CPU_TRAIN_BATCH)


@dataclass
class Row:
    """One line of the results table."""

    bench: str
    input: str
    impl: str
    images: int  # images per timed call
    seconds: float  # per timed call (the fastest, or the extrapolation)
    peak_bytes: int | None
    reps: str  # "n, range x%" or how an estimate was made
    speedup: str = ""
    check: str = ""

    @classmethod
    def of(cls, bench: str, input: str, impl: str, images: int, m: Measurement, **kw: str) -> Row:
        """A row from a measurement of calls that process ``images`` images each."""
        return cls(bench, input, impl, images, m.seconds, m.peak_bytes, f"{m.reps}, range {m.spread * 100:.0f}%", **kw)


def _ratio(baseline: float, ours: float) -> str:
    r = baseline / ours
    return f"×{r:.1f}" if r < 10 else f"×{r:.0f}"


# ------------------------------------------------------------------------------------------ inputs


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
    """uint8 (h, w, 3): bicubic-smoothed noise with a sharp-edged ellipse of another colour."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(h // 32, 2), max(w // 32, 2), 3), dtype=np.uint8)
    img = np.array(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))
    yy, xx = np.mgrid[:h, :w]
    img[((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2 < 1] = rng.integers(0, 256, 3)
    return img


def synthetic_maps(k: int, h: int, w: int, seed: int) -> np.ndarray:
    """float32 (k, h, w) smooth non-negative maps, each with max 1 (stand-ins for normalised CAMs)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, k, max(h // 8, 2), max(w // 8, 2), generator=g)
    maps = F.interpolate(coarse, (h, w), mode="bilinear", align_corners=False)[0]
    return (maps / maps.flatten(1).amax(1)[:, None, None]).numpy()


def synthetic_label(h: int, w: int, cls: int) -> np.ndarray:
    """uint8 (h, w): class ``cls`` in a central disc, an ignore (255) ring around it, background outside."""
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot((yy - h / 2) / h, (xx - w / 2) / w)
    return np.where(r < 0.25, cls, np.where(r < 0.32, 255, 0)).astype(np.uint8)


def _size(p: Profile) -> str:
    return f"{p.name} {p.size[0]}×{p.size[1]}"


# ---------------------------------------------------------------------------------------- make_cam


@torch.no_grad()
def per_view_cam(model: CAMNet, img: np.ndarray, scales: tuple[float, ...], keys: np.ndarray,
                 device: torch.device, amp: bool) -> tuple[np.ndarray, np.ndarray]:
    """Baseline: every (scale, flip) view is its own batch-of-one forward, and every CAM (all 20 classes)
    goes back to the host, where the views are resized and accumulated; classes are selected at the end."""
    h, w = img.shape[:2]
    strided = strided_size(h, w)
    padded16 = tuple(((d - 1) // 16 + 1) * 16 for d in (h, w))
    cam = np.zeros((model.classifier.out_channels, *strided), np.float32)
    high_res = np.zeros((model.classifier.out_channels, h, w), np.float32)
    for s in scales:
        view = normalize(rescale(img, s, order=3))
        for flip in (False, True):
            x = np.ascontiguousarray(view[:, ::-1] if flip else view)
            with autocast(device, amp):
                maps = model.cam(torch.from_numpy(hwc_to_chw(x))[None].to(device))
            maps = maps[0].float().cpu().numpy()
            maps = torch.from_numpy(np.ascontiguousarray(maps[:, :, ::-1] if flip else maps))[None]
            cam += F.interpolate(maps, strided, mode="bilinear", align_corners=False)[0].numpy()
            high_res += F.interpolate(maps, padded16, mode="bilinear", align_corners=False)[0, :, :h, :w].numpy()
    cam, high_res = cam[keys], high_res[keys]
    cam /= cam.reshape(len(keys), -1).max(1)[:, None, None] + 1e-5
    high_res /= high_res.reshape(len(keys), -1).max(1)[:, None, None] + 1e-5
    return cam, high_res


def bench_make_cam(ctx: Context, p: Profile) -> list[Row]:
    """make_cam's per-image work against the per-view baseline, on one image of the profile's size."""
    device, scales = ctx.device, tuple(p.preset["cam_scales"])
    model = CAMNet(build_backbone(p.preset["backbone"], None), NUM_CLASSES).to(device).eval()
    img = synthetic_image(*p.size, seed=0)
    label = np.zeros(NUM_CLASSES, np.float32)
    label[KEYS] = 1
    images = MultiScaleDataset([{"name": "synthetic", "label": label, "img": img}], scales)
    keys = torch.from_numpy(KEYS).to(device)
    out: dict[str, tuple] = {}

    def ours() -> None:
        item = images[0]  # the resizing that make_cam's loader workers do
        pairs = [x.to(device, non_blocking=True) for x in item["pairs"]]
        cam, high_res = multiscale_cam(PlainCAM(), model, pairs, item["size"], keys, ctx.amp)
        out["ours"] = cam.cpu().numpy(), high_res.cpu().numpy()

    def baseline() -> None:
        out["baseline"] = per_view_cam(model, img, scales, KEYS, device, ctx.amp)

    m = ctx.meter.compare({"ours": ours, "baseline": baseline})
    m_ours, m_base = m["ours"], m["baseline"]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(out["ours"], out["baseline"], strict=True))
    inp = f"{_size(p)}, {p.preset['backbone']}, {len(scales)} scales × 2 flips"
    return [
        Row.of("make_cam", inp, "ours: flip pair per forward, classes first", 1, m_ours,
               speedup=_ratio(m_base.seconds, m_ours.seconds), check=f"max abs diff {diff:.1e}"),
        Row.of("make_cam", inp, "baseline: one forward per view, fused on host", 1, m_base, speedup="1"),
    ]


# ------------------------------------------------------------------------------------- random walk


def bench_random_walk(ctx: Context, p: Profile) -> list[Row]:
    """Sparse against dense random walk on the stride-4 grid of the profile's image size."""
    h, w = strided_size(*p.size)
    x = torch.from_numpy(synthetic_maps(3, h, w, seed=1)).to(ctx.device)
    edge = torch.from_numpy(synthetic_maps(1, h, w, seed=2)[0] ** 4).to(ctx.device)  # mostly low, some ridges
    out: dict[str, torch.Tensor] = {}

    def walk(fn: Callable[..., torch.Tensor], name: str, exp_times: int) -> Callable[[], None]:
        def call() -> None:
            out[name] = fn(x, edge, beta=BETA, exp_times=exp_times, radius=RW_RADIUS)
        return call

    inp = f"{p.name} grid {h}×{w}, 3 maps"
    sparse = walk(random_walk, "sparse", EXP_TIMES)
    if ctx.device.type == "cuda" or h * w <= DENSE_FULL_MAX_PIXELS:
        m = ctx.meter.compare({"sparse": sparse, "dense": walk(random_walk_dense, "dense", EXP_TIMES)})
        m_sparse, m_dense = m["sparse"], m["dense"]
        dense = Row.of("random walk", inp, "baseline: dense (hw)² matrix, 8 squarings", 1, m_dense, speedup="1")
        compared = f"exp_times {EXP_TIMES}"
        out["sparse_same"] = out["sparse"]
    else:
        # Build + final product (exp_times 0), then one squaring (exp_times 1, timed once): every squaring
        # is the same (hw)³ matmul, and the peak memory of one squaring is that of eight.
        m = ctx.meter.compare({"sparse": sparse, "dense0": walk(random_walk_dense, "dense0", 0)})
        m_sparse, m0 = m["sparse"], m["dense0"]
        m1 = ctx.meter.measure(walk(random_walk_dense, "dense", 1), warmup=False, reps=1)
        m_dense = Measurement(m0.seconds + EXP_TIMES * max(m1.seconds - m0.seconds, 0.0), 0.0, 1, m1.peak_bytes)
        dense = Row("random walk", inp, "baseline: dense (hw)² matrix, 8 squarings", 1, m_dense.seconds,
                    m1.peak_bytes, f"est.: t(0) + 8 (t(1) - t(0)), {m0.reps}+1 runs", speedup="1")
        compared = "exp_times 1"
        walk(random_walk, "sparse_same", 1)()
    diff = float((out["sparse_same"] - out["dense"]).abs().max())
    scale = float(out["dense"].abs().max())
    dense.check = f"max abs diff {diff:.1e} (of max {scale:.2g}) at {compared}"
    memory = ""
    if m_sparse.peak_bytes and m_dense.peak_bytes:
        memory = f", {m_dense.peak_bytes / m_sparse.peak_bytes:.0f}× less memory"
    return [
        Row.of("random walk", inp, "ours: sparse, 256 neighbourhood steps", 1, m_sparse,
               speedup=_ratio(m_dense.seconds, m_sparse.seconds) + memory),
        dense,
    ]


# ---------------------------------------------------------------------------------------------- CRF


def bench_crf(ctx: Context, p: Profile) -> list[Row]:
    """IR labels from CAMs (two dense CRFs per image) with 1 and with 2 processes."""
    h, w = p.size
    jobs = [(synthetic_image(h, w, seed=i), synthetic_maps(len(KEYS), h, w, seed=10 + i), KEYS)
            for i in range(CRF_IMAGES)]
    inp = f"{_size(p)}, {len(KEYS)} classes, 2 CRFs/image"
    # A spawn pool as in cam_to_ir_label; the warm-up map starts both workers before timing.
    with mp.get_context("spawn").Pool(2) as pool:
        m = ctx.meter.compare({"one": lambda: [ir_label_from_cam(*job) for job in jobs],
                               "pool": lambda: pool.starmap(ir_label_from_cam, jobs, chunksize=1)},
                              no_memory={"pool"})
    m1, m2 = m["one"], m["pool"]
    return [
        Row.of("CRF (cam_to_ir_label)", inp, "1 process", CRF_IMAGES, m1, speedup="1"),
        Row.of("CRF (cam_to_ir_label)", inp, "2 worker processes", CRF_IMAGES, m2,
               speedup=_ratio(m1.seconds, m2.seconds)),
    ]


# ----------------------------------------------------------------------------------------- training


def _train_row(ctx: Context, bench: str, what: str, crop: int, batch: int, preset_batch: int,
               step: Callable[[], None]) -> Row:
    m = ctx.meter.measure(step)
    batch_note = "" if batch == preset_batch else f" (preset {preset_batch})"
    return Row.of(bench, f"{what}, crop {crop}², batch {batch}{batch_note}", "one optimiser step", batch, m)


def _optimiser_step(opt: torch.optim.Optimizer, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One timed training step: the loss (forward), backward and the optimiser update."""

    def step() -> None:
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    return step


def bench_train_cam(ctx: Context, p: Profile) -> list[Row]:
    """One CAM training step as in train_cam (multi-label soft-margin loss, poly SGD)."""
    device, crop = ctx.device, p.crop or p.preset["cam_crop_size"]
    batch = ctx.batch(p.preset["cam_batch_size"])
    model = CAMNet(build_backbone(p.preset["backbone"], None), NUM_CLASSES).to(device).train()
    backbone, head = model.param_groups()
    opt = PolyOptimizer([{"params": backbone, "lr": 1e-3}, {"params": head, "lr": 1e-2}], lr=1e-3,
                        weight_decay=1e-4, max_step=10**6)
    imgs = torch.randn(batch, 3, crop, crop, device=device)
    labels = torch.zeros(batch, NUM_CLASSES, device=device)
    labels[:, KEYS] = 1

    def loss() -> torch.Tensor:
        with autocast(device, ctx.amp):
            return PlainCAM().losses(model, imgs, labels)["loss"]

    step = _optimiser_step(opt, loss)

    return [_train_row(ctx, "train_cam", f"{p.name}, {p.preset['backbone']}", crop, batch,
                       p.preset["cam_batch_size"], step)]


def bench_train_irn(ctx: Context, p: Profile) -> list[Row]:
    """One IRN training step as in train_irn (radius-10 pair labels, boundary + displacement losses)."""
    device, crop = ctx.device, p.crop or p.preset["irn_crop_size"]
    batch = ctx.batch(p.preset["irn_batch_size"])
    model = IRN(build_backbone(p.preset["backbone"], None)).to(device).train()
    opt = PolyOptimizer(model.param_groups(1e-3), lr=1e-3, weight_decay=1e-4, max_step=10**6)
    grid = (crop + 3) // 4
    path_index = get_path_index(TRAIN_RADIUS, (grid, grid))
    imgs = torch.randn(batch, 3, crop, crop, device=device)
    ir_labels = np.stack([synthetic_label(grid, grid, cls=1 + i % NUM_CLASSES) for i in range(batch)])

    batch_data = {"img": imgs, "label": torch.from_numpy(ir_labels)}

    step = _optimiser_step(opt, lambda: irn_batch_losses(model, batch_data, path_index, device, ctx.amp)["total"])

    return [_train_row(ctx, "train_irn", f"{p.name}, {p.preset['backbone']}", crop, batch,
                       p.preset["irn_batch_size"], step)]


def bench_train_deeplab(ctx: Context, p: Profile) -> list[Row]:
    """One DeepLab training step as in train_deeplab (cross-entropy over labelled pixels, momentum SGD)."""
    device, crop = ctx.device, p.crop or p.preset["deeplab_crop_size"]
    batch = ctx.batch(p.preset["deeplab_batch_size"])
    arch, backbone = p.preset["deeplab_arch"], p.preset["deeplab_backbone"]
    model = build_deeplab(arch, backbone, None, 16, num_classes=NUM_CLASSES + 1).to(device).train()
    backbone_params, head = model.param_groups()
    opt = PolyOptimizer([{"params": backbone_params, "lr": 1e-4}, {"params": head, "lr": 1e-3}], lr=1e-4,
                        weight_decay=5e-4, max_step=10**6, momentum=0.9)
    imgs = torch.randn(batch, 3, crop, crop, device=device)
    target = torch.from_numpy(np.stack([synthetic_label(crop, crop, cls=1 + i % NUM_CLASSES) for i in range(batch)]))
    target = target.long().to(device)

    def loss() -> torch.Tensor:
        with autocast(device, ctx.amp):
            return DeepLabSegmenter().loss(model(imgs), target)

    step = _optimiser_step(opt, loss)

    return [_train_row(ctx, "train_deeplab", f"{p.name}, DeepLab-{arch} {backbone}", crop, batch,
                       p.preset["deeplab_batch_size"], step)]


# ------------------------------------------------------------------------------------ make_sem_seg


def bench_make_sem_seg(ctx: Context, p: Profile) -> list[Row]:
    """make_sem_seg_labels' per-image path on one image of the profile's size."""
    device = ctx.device
    irn = IRN(build_backbone(p.preset["backbone"], None)).to(device).eval()
    img = synthetic_image(*p.size, seed=3)
    cams = torch.from_numpy(synthetic_maps(len(KEYS), *strided_size(*p.size), seed=4))
    args = argparse.Namespace(beta=BETA, exp_times=EXP_TIMES, rw_normalize=False)

    def one_image() -> None:
        # As make_sem_seg_labels per image: IRN edge map (image + flip), random walk, labels.
        x = torch.from_numpy(hwc_to_chw(normalize(img)))[None].to(device)
        edge, _ = edge_and_displacement(irn, x)
        walked = propagate(cams.to(device), edge, img.shape[:2], args)
        scores_to_label(walked.cpu().numpy(), KEYS, 0.25)

    m = ctx.meter.measure(one_image)
    return [Row.of("make_sem_seg", f"{_size(p)}, IRN {p.preset['backbone']}",
                   "IRN forward + sparse walk + labels", 1, m)]
