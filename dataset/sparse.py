"""Sparse labels (points, scribbles) as data: reading the published layouts, checking their encoding,
converting the public sources, generating clicks, and the training set AGMM learns from (spec agmm 2-3).

Encoding (``misc.labels``, spec 2.2): ``0..K-1`` labelled pixel of that mask value (K = the dataset's
``num_labels``: VOC 21 with background 0, Cityscapes 19 trainIds), ``K`` unlabelled, and 255 never in a
file: it marks the padding a random crop adds. A file with 255 (the TEL / GatedCRF sources' "unlabelled")
or a value above ``K`` is refused with the reason, never read as something else.

Published layouts (``SparseLabels.folder``):

- VOC (and any VOC-layout folder, the demo included): ``<root>/point/segcls/<id>.png`` and
  ``<root>/scribble/seginst/<id>.png``, AGMM's rendering of What's the point (clicks) and ScribbleSup.
- Cityscapes: ``<root>/{20,50,100}clicks/<id>_gtFine_labelTrainIds.png`` (the ground truth's basename; a
  ``<city>/`` subfolder is accepted too).

Command line (each writes PNGs in the layout above, unlabelled = K):

    python -m dataset.sparse points --data_root VOC --json voc_whats_the_point.json \\
        voc_whats_the_point_bg_from_scribbles.json            # -> VOC/point/segcls
    python -m dataset.sparse scribbles --data_root VOC --xml voc_scribbles.zip   # -> VOC/scribble/seginst
    python -m dataset.sparse generate --dataset cityscapes --data_root CS --total 100 --seed 0  # -> CS/100clicks
    python -m dataset.sparse generate --kind scribbles --data_root VOC --out DIR   # seeded, from the masks

Rasterisation as TEL does it: a click is a filled disc of diameter 3 (``CLICK_RADIUS``), a scribble a
polyline of width 3 with curved joints plus a 3-pixel dot at every vertex, on a canvas of ``K``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter
from scipy import ndimage
from tqdm import tqdm

from dataset.base import DatasetInfo, read_id_list
from dataset.cityscapes import TRAIN_IDS_SUFFIX, Cityscapes
from dataset.samples import SegmentationDataset
from misc.errors import UserError
from misc.io import files_fingerprint, load_png, save_json, save_png
from misc.labels import SPARSE_PADDING, unlabelled_value

SUPERVISIONS: tuple[str, ...] = ("points", "scribbles")
VOC_FOLDERS = {"points": "point/segcls", "scribbles": "scribble/seginst"}  # AGMM's names (spec 10, B5)
CITYSCAPES_CLICKS: tuple[int, ...] = (20, 50, 100)
STROKE_WIDTH = 3  # TEL's clicks and scribbles
CLICK_RADIUS = STROKE_WIDTH // 2
# ScribbleSup's XML names of the VOC classes that VOC spells otherwise.
SCRIBBLESUP_NAMES = {"plane": "aeroplane", "bike": "bicycle", "table": "diningtable", "plant": "pottedplant",
                     "monitor": "tvmonitor"}


# ------------------------------------------------------------------------------------------ encoding


def check_encoding(mask: np.ndarray, num_labels: int, source: str | os.PathLike) -> np.ndarray:
    """``mask`` unchanged if it is a sparse label map of ``num_labels`` classes; else ``UserError`` saying
    which encoding it is in and how to fix it."""
    k = unlabelled_value(num_labels)
    values = set(np.unique(mask).tolist())
    if SPARSE_PADDING in values:
        if k not in values:
            raise UserError(f"sparse labels {source} use {SPARSE_PADDING} for unlabelled pixels (the TEL / GatedCRF "
                            f"encoding); this pipeline expects {k} (K) there, {SPARSE_PADDING} being crop padding: "
                            f"convert the sources with python -m dataset.sparse, or remap {SPARSE_PADDING} -> {k}.")
        raise UserError(f"sparse labels {source} hold {SPARSE_PADDING}, which marks crop padding and never a pixel "
                        f"of a file (unlabelled is {k}): remap those pixels to {k}.")
    above = sorted(v for v in values if v > k)
    if above:
        raise UserError(f"sparse labels {source} have values {above[:5]} above {k} (0..{k - 1} labelled, {k} "
                        f"unlabelled): not sparse labels of this dataset's {num_labels} classes (check --dataset).")
    return mask


def image_classes(mask: np.ndarray, num_labels: int) -> np.ndarray:
    """``cls_label`` of a sparse map ``(H, W)``: float32 ``(K,)`` multi-hot of its labelled values (K and 255
    excluded). Computed on the whole file, before the crop, as the reference does (bug B8)."""
    y = np.zeros(num_labels, np.float32)
    values = np.unique(mask)
    y[values[values < num_labels]] = 1.0
    return y


# -------------------------------------------------------------------------------------- the files


class SparseLabels:
    """Where the sparse labels of a dataset are, and reading them checked.

    ``folder``: given, else the published layout of ``supervision`` under the dataset root (Cityscapes:
    ``<clicks>clicks``; it has no published scribbles).
    """

    def __init__(self, info: DatasetInfo, supervision: str, folder: str | os.PathLike | None = None,
                 clicks: int = CITYSCAPES_CLICKS[-1]) -> None:
        if supervision not in SUPERVISIONS:
            raise ValueError(f"supervision {supervision!r} is not one of {SUPERVISIONS}")
        self.info, self.supervision = info, supervision
        self.cityscapes = isinstance(info, Cityscapes)
        if folder is not None:
            self.folder = Path(folder)
        elif self.cityscapes:
            if supervision != "points":
                raise UserError("Cityscapes has no published scribbles: give their folder with --sparse_dir.")
            self.folder = info.root / f"{clicks}clicks"
        else:
            self.folder = info.root / VOC_FOLDERS[supervision]

    def path(self, image_id: str) -> Path:
        if not self.cityscapes:
            return self.folder / f"{image_id}.png"
        flat = self.folder / f"{image_id}{TRAIN_IDS_SUFFIX}"
        nested = self.folder / image_id.split("_", 1)[0] / flat.name
        return nested if not flat.is_file() and nested.is_file() else flat

    def require(self, ids: Sequence[str]) -> None:
        """``UserError`` naming the first missing file unless every id has its sparse labels."""
        missing = [i for i in ids if not self.path(i).is_file()]
        if missing:
            raise UserError(f"{len(missing)} of {len(ids)} training images have no {self.supervision} labels (first: "
                            f"{self.path(missing[0])}): put them there (python -m dataset.sparse converts the public "
                            "sources or generates clicks), or point --sparse_dir at their folder.")

    def read(self, image_id: str) -> np.ndarray:
        """The checked sparse map of ``image_id``, uint8 ``(H, W)``, at the working resolution (nearest)."""
        path = self.path(image_id)
        return self.info.fit(check_encoding(load_png(path), self.info.num_labels, path), 0)

    def fingerprint(self, ids: Iterable[str]) -> str:
        """Identity of the files of ``ids`` (names, sizes, modification times): new labels retrain."""
        return files_fingerprint((i, self.path(i)) for i in ids)


class GroundTruthLabels:
    """The ground truth read as sparse labels with every pixel labelled (void -> unlabelled ``K``): the
    full-mask upper bound of a sparse-label segmenter (``--segmenter agmm --deeplab_gt true``), trained by the
    same network, losses, crop and augmentation as on points or scribbles. Same interface as ``SparseLabels``."""

    supervision = "gt"

    def __init__(self, info: DatasetInfo) -> None:
        self.info, self.folder = info, info.root

    def path(self, image_id: str) -> Path:
        """The mask ``read_training_mask`` reads (VOC: SBD's when present)."""
        return self.info.training_mask_file(image_id)

    def require(self, ids: Sequence[str]) -> None:
        missing = [i for i in ids if not self.info.has_training_mask(i)]
        if missing:
            raise UserError(f"{len(missing)} of {len(ids)} training images have no ground truth (first: "
                            f"{self.path(missing[0])}): train on a list whose ids have masks.")

    def read(self, image_id: str) -> np.ndarray:
        mask = self.info.read_training_mask(image_id).copy()
        mask[mask >= self.info.num_labels] = unlabelled_value(self.info.num_labels)
        return mask

    def fingerprint(self, ids: Iterable[str]) -> str:
        return files_fingerprint((i, p) for i in ids if (p := self.path(i)).is_file())


class SparseSegmentationDataset(SegmentationDataset):
    """``SegmentationDataset`` over sparse labels: the same joint scale / flip / crop (crop padding is 255,
    never ``K``, and the nearest-neighbour scaling invents no value), plus ``'cls_label'`` float32 ``(K,)``
    of the uncropped file."""

    def __init__(self, info: DatasetInfo, ids: Sequence[str], labels: SparseLabels | GroundTruthLabels,
                 **kwargs: Any) -> None:
        super().__init__(info, ids, None, **kwargs)
        self.labels = labels

    def read_label(self, name: str) -> tuple[Path, np.ndarray]:
        return self.labels.path(name), self.labels.read(name)

    def extras(self, name: str, label: np.ndarray) -> dict[str, Any]:
        return {"cls_label": image_classes(label, self.info.num_labels)}


def strong_augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """AGMM's photometric augmentation of uint8 ``(H, W, 3)`` (spec 3.6): colour jitter (brightness,
    contrast, saturation 0.5, hue 0.25, in random order) with p 0.5, grayscale p 0.1, Gaussian blur
    sigma ~ U(0.1, 2) p 0.5, a brightness shift U(-10, 10) p 0.5."""
    pil = Image.fromarray(img)
    if rng.random() < 0.5:
        for op in rng.permutation(4).tolist():
            if op == 0:
                pil = ImageEnhance.Brightness(pil).enhance(rng.uniform(0.5, 1.5))
            elif op == 1:
                pil = ImageEnhance.Contrast(pil).enhance(rng.uniform(0.5, 1.5))
            elif op == 2:
                pil = ImageEnhance.Color(pil).enhance(rng.uniform(0.5, 1.5))
            else:
                hsv = np.asarray(pil.convert("HSV")).copy()
                hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(rng.uniform(-0.25, 0.25) * 255)) % 256
                pil = Image.fromarray(hsv, "HSV").convert("RGB")
    if rng.random() < 0.1:
        pil = pil.convert("L").convert("RGB")
    if rng.random() < 0.5:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    out = np.asarray(pil)
    if rng.random() < 0.5:
        out = np.clip(np.round(out.astype(np.float32) + rng.uniform(-10, 10)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


# ------------------------------------------------------------------------------------ rasterising


def rasterise(size: tuple[int, int], num_labels: int, clicks: Iterable[tuple[int, float, float]] = (),
              scribbles: Iterable[tuple[int, Sequence[tuple[float, float]]]] = ()) -> np.ndarray:
    """Sparse map uint8 ``size = (H, W)`` from clicks ``(class, x, y)`` and scribbles ``(class, [(x, y),
    ...])`` drawn as TEL does (module docstring), on a canvas of the unlabelled value ``K``; later strokes
    win where they overlap."""
    canvas = Image.new("L", (size[1], size[0]), unlabelled_value(num_labels))
    draw = ImageDraw.Draw(canvas)
    r = CLICK_RADIUS

    def check(cls: int) -> int:
        if not 0 <= cls < num_labels:
            raise UserError(f"class {cls} outside 0..{num_labels - 1}: the source is not of this dataset")
        return cls

    for cls, x, y in clicks:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=check(cls))
    for cls, points in scribbles:
        pts = [(float(x), float(y)) for x, y in points]
        if len(pts) > 1:
            draw.line(pts, fill=check(cls), width=STROKE_WIDTH, joint="curve")
        for x, y in pts:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=check(cls))
    return np.asarray(canvas)


def _image_size(info: DatasetInfo, image_id: str) -> tuple[int, int] | None:
    """``(H, W)`` of the dataset's image (header only), None if it has none."""
    path = info.image(image_id)
    if not path.is_file():
        return None
    with Image.open(path) as img:
        return img.height, img.width


def convert_points(info: DatasetInfo, json_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> int:
    """What's the point clicks (``{id: [{"cls", "x", "y"}, ...]}``, VOC mask values; the foreground file and
    the background-from-scribbles one are merged) -> ``out_dir/<id>.png`` for every id with an image.
    Returns the number written."""
    clicks: dict[str, list[tuple[int, float, float]]] = {}
    for path in json_paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"clicks file {path} is unreadable ({e}).") from e
        for name, items in data.items():
            clicks.setdefault(name, []).extend((int(c["cls"]), float(c["x"]), float(c["y"])) for c in items)
    written = 0
    for name, items in sorted(clicks.items()):
        size = _image_size(info, name)
        if size is not None:
            save_png(Path(out_dir) / f"{name}.png", rasterise(size, info.num_labels, clicks=items), info.palette)
            written += 1
    return written


def parse_scribble_xml(data: bytes, info: DatasetInfo, source: str) -> tuple[tuple[int, int], list]:
    """ScribbleSup XML (``<size>``, ``<polygon><tag>class</tag><point><X/><Y/></point>...``) -> ``((H, W),
    [(mask value, [(x, y), ...]), ...])``."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(data)
        size = (int(root.findtext("size/height")), int(root.findtext("size/width")))
    except (ET.ParseError, TypeError, ValueError) as e:
        raise UserError(f"scribbles {source} are not ScribbleSup XML ({e}).") from e
    names = info.label_names
    lines = []
    for poly in root.iter("polygon"):
        tag = (poly.findtext("tag") or "").strip()
        tag = SCRIBBLESUP_NAMES.get(tag, tag)
        if tag not in names:
            raise UserError(f"scribbles {source} name class {tag!r}, which {info.name} does not have.")
        pts = [(int(p.findtext("X")), int(p.findtext("Y"))) for p in poly.iter("point")]
        if pts:
            lines.append((names.index(tag), pts))
    return size, lines


def convert_scribbles(info: DatasetInfo, source: str | os.PathLike, out_dir: str | os.PathLike) -> int:
    """ScribbleSup XMLs (a folder of ``<id>.xml`` or ``voc_scribbles.zip``) -> ``out_dir/<id>.png``."""
    source = Path(source)
    if source.is_dir():
        files = {p.stem: p.read_bytes for p in sorted(source.glob("*.xml"))}
    elif zipfile.is_zipfile(source):
        archive = zipfile.ZipFile(source)
        files = {Path(n).stem: (lambda n=n: archive.read(n)) for n in sorted(archive.namelist()) if n.endswith(".xml")}
    else:
        raise UserError(f"scribbles source {source} is neither a folder of XMLs nor a zip of them.")
    for name, read in files.items():
        size, lines = parse_scribble_xml(read(), info, f"{source}:{name}")
        save_png(Path(out_dir) / f"{name}.png", rasterise(size, info.num_labels, scribbles=lines), info.palette)
    return len(files)


# ------------------------------------------------------------------------------------ generating


def _inside(region: np.ndarray, margin: int) -> np.ndarray:
    """The pixels of ``region`` at least ``margin`` away from its outline (the region itself if none are)."""
    if margin == 0:
        return region
    eroded = ndimage.binary_erosion(region, iterations=margin)
    return eroded if eroded.any() else region


def _stamp(out: np.ndarray, region: np.ndarray, value: int, y: int, x: int, radius: int) -> None:
    """Mark the disc of ``radius`` around ``(y, x)`` with ``value``, only on ``region`` pixels (a click
    never labels a pixel of another class)."""
    y0, y1, x0, x1 = max(0, y - radius), y + radius + 1, max(0, x - radius), x + radius + 1
    yy, xx = np.ogrid[y0 : min(y1, out.shape[0]), x0 : min(x1, out.shape[1])]
    disc = (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
    window = out[y0 : y1, x0 : x1]
    window[disc & region[y0 : y1, x0 : x1]] = value


def generate_clicks(mask: np.ndarray, num_labels: int, rng: np.random.Generator, *, per_class: int | None = None,
                    total: int | None = None, radius: int = CLICK_RADIUS) -> np.ndarray:
    """Seeded clicks from a full mask ``(H, W)`` (values ``0..K-1``, 255 void) -> sparse map uint8 ``(H, W)``.

    ``per_class``: that many clicks on every class present (fewer if it has fewer pixels), each at least
    ``radius`` inside its region where it can be. ``total``: that many clicks drawn uniformly among the
    valid pixels (the spec's proposal for Cityscapes' N clicks). Void pixels are never clicked; a click's
    disc covers only pixels of its own class.
    """
    if (per_class is None) == (total is None):
        raise ValueError("give exactly one of per_class and total")
    out = np.full(mask.shape, unlabelled_value(num_labels), np.uint8)
    if total is not None:
        valid = np.flatnonzero(mask.ravel() < num_labels)
        picks = rng.choice(valid, size=min(total, valid.size), replace=False)
        for y, x in zip(*np.unravel_index(picks, mask.shape), strict=True):
            _stamp(out, mask == mask[y, x], int(mask[y, x]), int(y), int(x), radius)
        return out
    for value in np.unique(mask[mask < num_labels]).tolist():
        region = mask == value
        candidates = np.flatnonzero(_inside(region, radius).ravel())
        picks = rng.choice(candidates, size=min(per_class, candidates.size), replace=False)
        for y, x in zip(*np.unravel_index(picks, mask.shape), strict=True):
            _stamp(out, region, value, int(y), int(x), radius)
    return out


def generate_scribbles(mask: np.ndarray, num_labels: int, rng: np.random.Generator, vertices: int = 4,
                       margin: int = 3) -> np.ndarray:
    """Seeded scribbles from a full mask: in every connected region of every class, a polyline of width 3
    through ``vertices`` random points of its interior (``margin`` inside the outline), ordered along the
    region's long axis so it sweeps through it, kept on the region's pixels. ``(H, W)`` -> uint8 sparse map."""
    out = np.full(mask.shape, unlabelled_value(num_labels), np.uint8)
    for value in np.unique(mask[mask < num_labels]).tolist():
        components, n = ndimage.label(mask == value)
        for c in range(1, n + 1):
            region = components == c
            ys, xs = np.nonzero(_inside(region, margin))
            if ys.size < 2:
                continue
            idx = rng.choice(ys.size, size=min(vertices, ys.size), replace=False)
            pts = np.stack([xs[idx], ys[idx]], 1).astype(np.float64)
            axis = 0 if np.ptp(xs) >= np.ptp(ys) else 1
            pts = pts[np.argsort(pts[:, axis])]
            stroke = rasterise(mask.shape, num_labels, scribbles=[(value, [tuple(p) for p in pts])])
            keep = (stroke == value) & region
            out[keep] = value
    return out


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """The generator of one image's clicks: a function of the seed and the id only (not of the list order)."""
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha1(image_id.encode()).digest()[:8], "little")])


def write_generated(info: DatasetInfo, ids: Sequence[str], out_dir: str | os.PathLike, seed: int,
                    supervision: str = "points", *, per_class: int | None = None, total: int | None = None) -> Path:
    """Generate the sparse labels of ``ids`` from the dataset's ground truth into ``out_dir`` (the layout's
    file names): clicks (``generate_clicks``, ``per_class`` or ``total``) or scribbles (``generate_scribbles``),
    and record the settings in ``out_dir/generated.json``, so the files are known and kept fixed."""
    missing = [i for i in ids if not info.has_mask(i)]
    if missing:  # checked before any file is written
        raise UserError(f"{len(missing)} of {len(ids)} images have no mask to draw labels from (first: "
                        f"{info.seg_class(missing[0])}): give --list the ids that have masks.")
    labels = SparseLabels(info, supervision, out_dir)
    for i in tqdm(ids, desc=f"generate {supervision}", mininterval=2):
        mask, rng = info.load_mask(i), image_rng(seed, i)
        sparse = (generate_clicks(mask, info.num_labels, rng, per_class=per_class, total=total)
                  if supervision == "points" else generate_scribbles(mask, info.num_labels, rng))
        save_png(labels.path(i), sparse, info.palette)
    generator = "generate_clicks" if supervision == "points" else "generate_scribbles"
    save_json(Path(out_dir) / "generated.json", {"supervision": supervision, "seed": seed, "per_class": per_class,
                                                 "total": total, "images": len(ids),
                                                 "generator": f"dataset.sparse.{generator}"})
    return Path(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    import dataset

    p = argparse.ArgumentParser(prog="python -m dataset.sparse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("points", "scribbles", "generate"):
        s = sub.add_parser(name)
        s.add_argument("--dataset", default="voc12")
        s.add_argument("--data_root", required=True)
        s.add_argument("--out", default=None, help="default: the published layout under the root")
        if name == "points":
            s.add_argument("--json", nargs="+", required=True, help="What's the point JSON files (fg, bg)")
        elif name == "scribbles":
            s.add_argument("--xml", required=True, help="ScribbleSup: a folder of XMLs or voc_scribbles.zip")
        else:
            s.add_argument("--kind", choices=SUPERVISIONS, default="points")
            s.add_argument("--list", default=None, help="ids to label (default: the dataset's train list)")
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--per_class", type=int, default=None, help="points: clicks on every class present")
            s.add_argument("--total", type=int, default=None, help="points: clicks drawn over the valid pixels")
    args = p.parse_args(argv)
    try:
        info = dataset.get_dataset(args.dataset, args.data_root).check()
        if args.command == "generate":
            points = args.kind == "points"
            if points and (args.per_class is None) == (args.total is None):
                p.error("--kind points: give one of --per_class N and --total N")
            if not points and (args.per_class, args.total) != (None, None):
                p.error("--per_class and --total are for --kind points; scribbles mark every region once")
            clicks = args.total if args.total in CITYSCAPES_CLICKS else CITYSCAPES_CLICKS[-1]
            out = args.out or SparseLabels(info, args.kind, clicks=clicks).folder
            lists = (info.list_path(split, Path(out) / "lists") for split in info.default_lists["train_list"])
            lst = args.list or next((path for path in lists if path is not None), None)
            if lst is None:
                p.error(f"{info.root} has no training list ({' or '.join(info.default_lists['train_list'])}): "
                        "give the ids to label with --list")
            ids = read_id_list(lst)
            write_generated(info, ids, out, args.seed, args.kind, per_class=args.per_class, total=args.total)
            print(f"{len(ids)} {args.kind} files in {out}")
        else:
            out = args.out or SparseLabels(info, args.command).folder
            n = (convert_points(info, args.json, out) if args.command == "points"
                 else convert_scribbles(info, args.xml, out))
            print(f"{n} {args.command} files in {out}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
