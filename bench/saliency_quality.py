"""How well does a saliency source find a dataset's objects? (RCA's pseudo masks lean on it: rca spec 9.)

Scores grey saliency maps (0-255) against the ground-truth foreground of every listed image (any class = 1,
background = 0, void pixels left out), with the salient-object literature's measures: MAE (mean absolute error
of ``S / 255``), the max F-measure over 255 thresholds (precision and recall averaged over images at each
threshold, ``beta^2 = 0.3``) and the foreground IoU at ``S >= 128`` (averaged over images). Two references
that need no model sit beside it: a centred Gaussian (sigma a third of each side) and "everything salient".

``--saliency_model img_focus`` first predicts the maps into ``--maps`` (images that already have one are
skipped, so the folder can be handed to ``--saliency_dir`` afterwards):

    python -m bench.saliency_quality --data_root ../shared/data/voc12_photos --maps runs/saliency_photos \\
        --saliency_model img_focus
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

import dataset
from dataset.base import DatasetInfo, read_id_list
from methods.saliency import MODELS, predict_maps, read_saliency

BETA2 = 0.3
THRESHOLDS = np.arange(1, 256)


def centre_prior(shape: tuple[int, int]) -> np.ndarray:
    """A centred Gaussian, uint8 ``(H, W)``, 255 at the centre, sigma a third of each side."""
    h, w = shape
    y = (np.arange(h) - (h - 1) / 2) / (h / 3)
    x = (np.arange(w) - (w - 1) / 2) / (w / 3)
    return np.round(255 * np.exp(-0.5 * (y[:, None] ** 2 + x[None] ** 2))).astype(np.uint8)


def image_scores(saliency: np.ndarray, mask: np.ndarray, num_classes: int) -> dict[str, np.ndarray | float]:
    """One image: ``saliency`` uint8 ``(H, W)``, ``mask`` its label map (0 background, 1..num_classes, void
    other) -> its absolute error, foreground IoU at 128, and precision / recall at each of ``THRESHOLDS``."""
    valid = mask <= num_classes
    fg = (mask > 0)[valid]
    s = saliency[valid].astype(np.int64)
    # Pixels at or above each threshold, and how many of them are foreground: from the histograms.
    above = np.cumsum(np.bincount(s, minlength=256)[::-1])[::-1][THRESHOLDS]
    hits = np.cumsum(np.bincount(s[fg], minlength=256)[::-1])[::-1][THRESHOLDS]
    precision = np.where(above > 0, hits / np.maximum(above, 1), 0.0)
    recall = hits / max(int(fg.sum()), 1)
    predicted = s >= 128
    union = (predicted | fg).sum()
    iou = (predicted & fg).sum() / union if union else 1.0
    return {"mae": float(np.abs(s / 255 - fg).mean()), "iou": float(iou), "precision": precision,
            "recall": recall}


def score(maps: Callable[[str, tuple[int, int]], np.ndarray], info: DatasetInfo, ids: list[str], desc: str
          ) -> dict[str, float]:
    """MAE, max F-measure (and its threshold) and mean IoU (percent, but MAE) of ``maps(id, mask shape)`` over
    ``ids``."""
    rows = []
    for i in tqdm(ids, desc=desc, mininterval=2):
        mask = info.read_mask(i)
        rows.append(image_scores(maps(i, mask.shape), mask, info.num_classes))
    precision = np.mean([r["precision"] for r in rows], 0)
    recall = np.mean([r["recall"] for r in rows], 0)
    f = (1 + BETA2) * precision * recall / np.maximum(BETA2 * precision + recall, 1e-12)
    best = int(f.argmax())
    return {"mae": float(np.mean([r["mae"] for r in rows])), "max_f": 100 * float(f[best]),
            "threshold": int(THRESHOLDS[best]), "iou": 100 * float(np.mean([r["iou"] for r in rows]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.saliency_quality", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="voc12")
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--lists", nargs="+", default=["train", "val"],
                        help="id lists: split names of the dataset or files")
    parser.add_argument("--maps", required=True,
                        help="folder of <id>.png saliency maps (written with --saliency_model)")
    parser.add_argument("--saliency_model", choices=sorted(MODELS), default=None)
    args = parser.parse_args(argv)
    info = dataset.get_dataset(args.dataset, args.data_root, None).check()
    ids: list[str] = []
    for name in args.lists:
        path = Path(name) if Path(name).is_file() else info.list_path(name, args.maps)
        if path is None:
            parser.error(f"no list {name!r} in {args.data_root}: give a file")
        ids += read_id_list(path)
    ids = [i for i in dict.fromkeys(ids) if info.has_mask(i)]
    maps = Path(args.maps)
    if args.saliency_model:
        predict_maps(args.saliency_model, info, ids, maps)
    sources: dict[str, Callable[[str, tuple[int, int]], np.ndarray]] = {
        f"{args.saliency_model or maps}": lambda i, shape: read_saliency(maps / f"{i}.png", shape),
        "centre prior (Gaussian)": lambda _, shape: centre_prior(shape),
        "everything salient": lambda _, shape: np.full(shape, 255, np.uint8),
    }
    print(f"{len(ids)} images of {args.data_root}\n")
    print("| saliency | MAE | max F (beta^2 0.3) | at threshold | fg IoU at 128 |")
    print("|---|---|---|---|---|")
    for name, source in sources.items():
        r = score(source, info, ids, name)
        print(f"| {name} | {r['mae']:.3f} | {r['max_f']:.1f} | {r['threshold']} | {r['iou']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
