"""The visual report of a run (``report.html``) and the side-by-side page of several runs.

    python -m misc.report WORK_DIR                     # <WORK_DIR>/report.html (the driver's report step)
    python -m misc.report DIR1 DIR2 ... --out cmp.html  # several runs side by side, mean +- std over seeds
    python -m misc.report runs/demo/seed0 runs/demo/seed1 runs/demo/seed2 --ignore cda deeplab_crf deeplab_gt

A page is plain HTML with its pictures as PNG files in a folder beside it (no network, no JavaScript):
the run's settings, the summary of every stage and round (with the published numbers on VOC), per-class
IoU charts, training curves, a gallery of a fixed seeded sample of images (image, ground truth, CAM per
class, IR seeds, pseudo mask, segmenter prediction, each with its IoU) with the best and worst images by
pseudo-mask IoU, and the step times. Everything is read from the work dir's files; nothing is recomputed
but the per-image IoUs.
"""

from __future__ import annotations

import argparse
import html
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import yaml
from matplotlib.figure import Figure
from PIL import Image

import dataset
from dataset.base import DatasetInfo, read_id_list
from misc.errors import UserError
from misc.io import atomic_write, latest_metrics, load_cam, load_png
from misc.metrics import confusion_matrix, headline, seed_details, segmentation_scores

ASSETS = "report_files"
TILE_HEIGHT = 160
SMOOTHING = 0.05  # the running mean of a training curve spans this fraction of its steps
# Published VOC 2012 numbers (IRNet, Ahn et al. 2019; CDA, Su et al. 2021): (variant, step) -> mIoU / mAP.
PUBLISHED = {"voc12": {("baseline", "eval_cam"): 48.3, ("baseline", "eval_sem_seg"): 66.5,
                       ("baseline", "eval_ins_seg"): 37.7, ("baseline", "eval_deeplab"): 63.5,
                       ("cda", "eval_cam"): 50.8, ("cda", "eval_sem_seg"): 67.7, ("cda", "eval_deeplab"): 66.1}}
STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1280px;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:2px 4px 8px 0;vertical-align:top}figcaption{font-size:12px;color:#555}
img.plot{max-width:100%}details{margin:8px 0}code{background:#f4f4f4;padding:0 3px}"""


def _esc(value: object) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f'<td class="num">{v:.2f}</td>'
        return f"<td>{_esc(v)}</td>"

    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _notes(row: dict[str, Any]) -> str:
    """What a summary row's number needs beside it: the CAM threshold it was taken at, the ignored pixels."""
    if "sweep" in row:
        best = max(row["sweep"].values())
        return f"at threshold {row['threshold']}; best {row['best_threshold']:.2f}: {best:.2f}"
    if "ignored" in row:
        return f"over labelled pixels, {100 * row['ignored']:.0f}% ignored"
    if "fg_precision" in row:
        return seed_details(row)
    if "labels" in row:
        return f"trained on {'ground truth' if row['labels'] == 'gt' else 'pseudo masks'}"
    return ""


def _stage_label(key: tuple[str, str, str | None]) -> str:
    variant, step, post = key
    return f"{variant} {step}" + (f" ({post})" if post else "")


def _read_config(work_dir: Path) -> dict[str, Any]:
    path = work_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _save_figure(fig: Figure, path: Path) -> None:
    """Figures are made without pyplot (no global state, no display): saving is all they need."""
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")


# ------------------------------------------------------------------------------------------- charts


def per_class_chart(metrics: dict[tuple, dict], path: Path) -> bool:
    """Grouped horizontal bars: per-class IoU of every evaluated stage. False when nothing has per-class IoU."""
    stages = [(k, r) for k, r in metrics.items() if "per_class" in r]
    if not stages:
        return False
    names = list(stages[0][1]["per_class"])
    present = [n for n in names if any(r["per_class"].get(n) is not None for _, r in stages)]
    fig = Figure(figsize=(10, 1.5 + 0.32 * len(present) * max(1, len(stages)) ** 0.5))
    ax = fig.subplots()
    height = 0.8 / len(stages)
    y = np.arange(len(present))
    for i, (key, row) in enumerate(stages):
        values = [row["per_class"].get(n) or 0.0 for n in present]
        ax.barh(y + i * height, values, height, label=_stage_label(key))
    ax.set_yticks(y + 0.4 - height / 2, present)
    ax.invert_yaxis()
    ax.set_xlabel("IoU (%)")
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    _save_figure(fig, path)
    return True


def training_curves(work_dir: Path, path: Path) -> list[str]:
    """One panel per trained network: every logged loss per step (and a running mean). Returns the names."""
    logs = sorted(work_dir.glob("*/sess/*.log.jsonl")) + sorted(work_dir.glob("deeplab/*/*.log.jsonl"))
    logs = [p for p in logs if p.stat().st_size]
    if not logs:
        return []
    fig = Figure(figsize=(4.2 * len(logs), 3.2))
    axes = fig.subplots(1, len(logs), squeeze=False)
    names = []
    for ax, log in zip(axes[0], logs, strict=True):
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        name = f"{log.parent.parent.name if log.parent.name == 'sess' else 'deeplab ' + log.parent.name}: " \
               f"{log.name.split('.')[0]}"
        names.append(name)
        steps = [r["step"] for r in rows]
        for key in (k for k in rows[0] if k not in ("step", "lr")):
            values = np.array([r[key] for r in rows], dtype=float)
            width = max(1, round(len(values) * SMOOTHING))
            smooth = np.convolve(values, np.ones(width) / width, mode="valid")
            line = ax.plot(steps, values, alpha=0.25)[0]
            ax.plot(steps[width - 1:], smooth, color=line.get_color(), label=key)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save_figure(fig, path)
    return names


# ------------------------------------------------------------------------------------------ gallery


def _resize(img: np.ndarray, nearest: bool) -> Image.Image:
    h, w = img.shape[:2]
    size = (max(1, round(w * TILE_HEIGHT / h)), TILE_HEIGHT)
    return Image.fromarray(img).resize(size, Image.NEAREST if nearest else Image.BILINEAR)


def colour(label: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """uint8 (H, W) labels -> (H, W, 3) RGB in the dataset's palette."""
    return info.palette.reshape(256, 3)[label]


def heat_overlay(img: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """A (H, W) CAM in [0, 1] as a jet heat map over the (H, W, 3) image, half and half."""
    heat = matplotlib.colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255
    return (0.5 * img + 0.5 * heat).astype(np.uint8)


def image_iou(info: DatasetInfo, gt: np.ndarray, pred: np.ndarray) -> float | None:
    """mIoU of one image over the labels in its ground truth or prediction (``None`` if neither has any)."""
    if pred.shape != gt.shape:
        return None
    return segmentation_scores(confusion_matrix(gt, pred, info.num_labels, info.ignore), info.label_names)["miou"]


class Gallery:
    """Tiles of one work dir's images, written into ``assets`` as PNG files; with a ``variant`` (round) its
    CAMs, IR seeds and pseudo masks are shown too."""

    def __init__(self, work_dir: Path, info: DatasetInfo, assets: Path, variant: str | None) -> None:
        self.work_dir, self.info, self.assets, self.variant = work_dir, info, assets, variant

    def _tile(self, image_id: str, kind: str, img: np.ndarray, nearest: bool, caption: str) -> str:
        name = f"{image_id}_{kind}.png"
        with atomic_write(self.assets / name) as f:
            _resize(img, nearest).save(f, format="PNG")
        return (f'<figure><img src="{ASSETS}/{name}" alt="{_esc(kind)}">'
                f"<figcaption>{_esc(caption)}</figcaption></figure>")

    def _score(self, gt: np.ndarray | None, pred: np.ndarray) -> str:
        iou = image_iou(self.info, gt, pred) if gt is not None else None
        return "" if iou is None else f" · IoU {iou:.1f}"

    def row(self, image_id: str, segmenter_dir: Path | None = None) -> str:
        """One image: photo, ground truth, CAM per class, IR seeds, pseudo mask (and the segmenter's prediction)."""
        info = self.info
        img = info.read_photo(image_id)
        gt = info.read_mask(image_id) if info.has_mask(image_id) else None
        tiles = [self._tile(image_id, "image", img, False, image_id)]
        if gt is not None:
            tiles.append(self._tile(image_id, "gt", colour(gt, info), True, "ground truth"))
        round_dir = self.work_dir / self.variant if self.variant is not None else None
        cam_file = round_dir / "cam" / f"{image_id}.npz" if round_dir is not None else None
        if cam_file is not None and cam_file.is_file():
            cams = load_cam(cam_file)
            for key, cam in zip(cams["keys"], cams["high_res"], strict=True):
                tiles.append(self._tile(image_id, f"cam{key}", heat_overlay(img, cam), False,
                                        f"CAM {info.class_names[key]}"))
        for folder, caption in (("ir_label", "IR seeds (cream: uncertain)"), ("sem_seg", "pseudo mask")):
            path = round_dir / folder / f"{image_id}.png" if round_dir is not None else None
            if path is not None and path.is_file():
                label = load_png(path)
                score = self._score(gt, label) if folder == "sem_seg" else ""
                tiles.append(self._tile(image_id, folder, colour(label, info), True, caption + score))
        if segmenter_dir is not None and (segmenter_dir / f"{image_id}.png").is_file():
            pred = load_png(segmenter_dir / f"{image_id}.png")
            tiles.append(self._tile(image_id, "pred", colour(pred, info), True,
                                    f"{segmenter_dir.parent.name} prediction" + self._score(gt, pred)))
        return "<div>" + "".join(tiles) + "</div>"


def _sample(ids: Sequence[str], n: int, seed: int) -> list[str]:
    """A fixed, seeded choice of ``n`` of ``ids`` (all of them if fewer), sorted."""
    return sorted(np.random.default_rng(seed).choice(ids, size=min(n, len(ids)), replace=False).tolist())


def pseudo_mask_ious(work_dir: Path, info: DatasetInfo, variant: str, ids: Sequence[str]) -> dict[str, float]:
    """Per-image mIoU of a round's pseudo masks, for the ids that have both a mask and ground truth."""
    out = {}
    for image_id in ids:
        path = work_dir / variant / "sem_seg" / f"{image_id}.png"
        if path.is_file() and info.has_mask(image_id):
            iou = image_iou(info, info.read_mask(image_id), load_png(path))
            if iou is not None:
                out[image_id] = iou
    return out


# --------------------------------------------------------------------------------------------- pages


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>{body}</body></html>\n")


def _timings(work_dir: Path) -> list[tuple[str, str, float]]:
    path = work_dir / "timings.jsonl"
    if not path.is_file():
        return []
    return [(t["variant"], t["step"], t["seconds"]) for t in map(json.loads, path.read_text().splitlines())]


def write_report(work_dir: str | Path, images: int = 6, seed: int = 0) -> Path:
    """Write ``<work_dir>/report.html`` (pictures in ``<work_dir>/report_files/``); return its path.

    ``images``: how many images of the evaluation list the gallery shows (a seeded sample), plus the three
    best and three worst by pseudo-mask IoU.
    """
    work_dir = Path(work_dir)
    config = _read_config(work_dir)
    if not config:
        raise UserError(f"{work_dir} has no config.yaml: it is not the work dir of a run (or a run from before "
                        "config.yaml existed; re-run it to write one).")
    resolved = config.get("_resolved", {})
    info = dataset.get_dataset(config["dataset"], config["_dataset"]["root"], config.get("max_image_side"))
    assets = work_dir / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    metrics = latest_metrics(work_dir)
    parts = []

    # The papers' numbers belong beside a run on the dataset itself, not beside the demo in its layout.
    published = PUBLISHED.get(info.name, {}) if config.get("data_root") is not None else {}
    rows = []
    for key, row in metrics.items():
        metric, value = headline(row)
        paper = published.get(key[:2]) if key[2] in (None, "msf+crf") else None
        paper_cell = ("-" if paper is None else paper,) if published else ()
        rows.append((key[0], key[1], key[2] or "", row.get("split", "-"), metric, value, *paper_cell, _notes(row)))
    paper_header = (f"published ({info.name})",) if published else ()
    parts.append("<h2>Summary</h2>" + _table(
        ["round", "step", "postprocess", "split", "metric", "value", *paper_header, "notes"], rows))

    if per_class_chart(metrics, assets / "per_class.png"):
        parts.append(f'<h2>Per-class IoU</h2><img class="plot" src="{ASSETS}/per_class.png" alt="per-class IoU">')
    if training_curves(work_dir, assets / "training.png"):
        parts.append(f'<h2>Training curves</h2><img class="plot" src="{ASSETS}/training.png" alt="training curves">')

    variant = "cda" if (work_dir / "cda" / "sem_seg").is_dir() else "baseline"
    gallery = Gallery(work_dir, info, assets, variant)
    eval_list = resolved.get("eval_list")
    if eval_list and Path(eval_list).is_file():
        ids = read_id_list(eval_list)
        sample = _sample(ids, images, seed)
        parts.append(f"<h2>Gallery: {_esc(variant)} round, {len(sample)} images of "
                     f"{_esc(Path(eval_list).stem)} (seed {seed})</h2>" + "".join(gallery.row(i) for i in sample))
        ious = pseudo_mask_ious(work_dir, info, variant, ids)
        if ious:
            ranked = sorted(ious, key=ious.get)
            for title, chosen in (("Best", ranked[::-1][:3]), ("Worst", ranked[:3])):
                parts.append(f"<h2>{title} pseudo masks of {_esc(Path(eval_list).stem)}</h2>"
                             + "".join(gallery.row(i) for i in chosen))
    val_list = resolved.get("val_list")
    segmenter_dirs = sorted((work_dir / "deeplab").glob("*/pred_*")) if (work_dir / "deeplab").is_dir() else []
    if val_list and Path(val_list).is_file() and segmenter_dirs:
        ids = read_id_list(val_list)
        sample = _sample(ids, images, seed)
        parts.append(f"<h2>Segmenter on {_esc(Path(val_list).stem)} ({_esc(segmenter_dirs[-1].relative_to(work_dir))})"
                     "</h2>" + "".join(Gallery(work_dir, info, assets, None).row(i, segmenter_dirs[-1])
                                       for i in sample))

    times = _timings(work_dir)
    if times:
        parts.append("<h2>Step times</h2>" + _table(["round", "step", "seconds"], [
            *times, ("all", "total", sum(t[2] for t in times))]))
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    parts.append("<h2>Settings</h2><details><summary>every flag of the run (config.yaml)</summary>"
                 + _table(["flag", "value"], sorted(settings.items())) + "</details>"
                 + _table(["", ""], [("dataset", f"{info.name} at {info.root}"),
                                     *config.get("_versions", {}).items()]))
    out = work_dir / "report.html"
    with atomic_write(out, "w") as f:
        f.write(_page(f"WSSS run: {work_dir.name}", "".join(parts)))
    return out


def _group_key(config: dict[str, Any], ignore: Sequence[str]) -> str:
    """A run's settings without those that differ between seeds of one configuration (and ``ignore``)."""
    skip = {"seed", "work_dir", *ignore}
    settings = {k: v for k, v in config.items() if not k.startswith("_") and k not in skip}
    return json.dumps(settings, sort_keys=True, default=str)


def write_comparison(work_dirs: Sequence[str | Path], out: str | Path, ignore: Sequence[str] = ()) -> Path:
    """One page comparing runs: runs of the same settings but the seed are one column, mean +- std.

    ``ignore``: settings that do not tell configurations apart, e.g. those of a later evaluation-only re-run
    in the same work dir (its config.yaml holds the last run's flags; ``bench.demo_runs`` re-runs each seed
    with ``--cda false``, ``--deeplab_crf false`` and ``--deeplab_gt true``)."""
    out = Path(out)
    groups: dict[str, list[Path]] = defaultdict(list)
    configs = {}
    for work_dir in map(Path, work_dirs):
        config = _read_config(work_dir)
        if not config:
            raise UserError(f"{work_dir} has no config.yaml: pass work dirs of runs.")
        groups[_group_key(config, ignore)].append(work_dir)
        configs[work_dir] = config
    # Name each configuration by the settings that tell it apart from the others.
    settings = [json.loads(k) for k in groups]
    differing = sorted({k for s in settings for k in s if any(s.get(k) != t.get(k) for t in settings)})
    names = []
    for key, dirs in groups.items():
        s = json.loads(key)
        label = ", ".join(f"{k}={s.get(k)}" for k in differing) or "same settings"
        names.append(f"{label} ({len(dirs)} run{'s' * (len(dirs) > 1)})")
    values: dict[tuple, list[list[float]]] = defaultdict(lambda: [[] for _ in groups])
    for g, dirs in enumerate(groups.values()):
        for work_dir in dirs:
            for key, row in latest_metrics(work_dir).items():
                values[key][g].append(headline(row)[1])

    def cell(vals: list[float]) -> str:
        if not vals:
            return "-"
        if len(vals) == 1:
            return f"{vals[0]:.2f}"
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"

    rows = [(_stage_label(key), *(cell(v) for v in per_group)) for key, per_group in values.items()]
    runs = _table(["configuration", "work dirs"], [(n, ", ".join(str(d) for d in dirs))
                                                  for n, dirs in zip(names, groups.values(), strict=True)])
    body = ("<h2>Every stage (mean ± std over the runs of a configuration)</h2>"
            + _table(["stage", *names], rows) + "<h2>Runs</h2>" + runs)
    with atomic_write(out, "w") as f:
        f.write(_page(f"WSSS runs side by side ({len(configs)} runs)", body))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="comparison page (several work dirs): default compare.html")
    p.add_argument("--images", type=int, default=6, help="gallery size of a single run's report")
    p.add_argument("--ignore", nargs="*", default=[], metavar="FLAG",
                   help="settings that do not tell runs apart (e.g. cda deeplab_crf deeplab_gt for bench.demo_runs)")
    args = p.parse_args(argv)
    try:
        if len(args.work_dirs) == 1 and args.out is None:
            print(write_report(args.work_dirs[0], args.images))
        else:
            print(write_comparison(args.work_dirs, args.out or Path("compare.html"), args.ignore))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
