"""CAM stores (folders of ``misc.io.save_cam`` files): ORANDNet's OR / AND combination, and the converter
of CAMs made elsewhere (orandnet spec 5, 13).

    python -m misc.cam_store combine DIR_A DIR_B --or_dir OR --and_dir AND [--offset 0.15] [--ids LIST]
    python -m misc.cam_store convert --format irn|amn|mctformer SRC_DIR OUT_DIR [--suffix .npy]

``combine`` reads two stores of the standard format (``allow_pickle=False``, as everything the pipeline
reads) and writes the OR and the AND store in it. ``convert`` is the only code of the project that
unpickles: the reference's ``.npy`` dicts are pickles, which can run code when loaded, so they are read
only by this explicit command, on files the user chose to trust, and written out in the standard format.

OR / AND of two maps ``r`` (store A) and ``v`` (store B) of one class, with ``v' = v + offset``::

    OR  = r + v' - r * v'     (probabilistic sum: high recall)
    AND = r * v'              (product: high precision)

Neither is clipped (with offset 0.15, OR reaches 1.15), so unlike other stores these two are not
max-normalised: ORANDNet learns from them as they are, and eval_cam thresholds them as they are.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from misc.errors import UserError, user_message
from misc.io import files_fingerprint, load_cam, save_cam
from misc.pipeline import MANIFEST

FORMATS = ("irn", "amn", "mctformer")


def or_and(r: np.ndarray, v: np.ndarray, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-wise OR and AND of two maps of the same shape (any ``(k, H, W)``), ``v`` shifted by ``offset``
    first (spec 5: 0.15 puts a ViT map, thresholded at 0.05, on a ResNet CAM's 0.20)."""
    v = v + offset
    return r + v - r * v, r * v


def strided_size(h: int, w: int, stride: int = 4) -> tuple[int, int]:
    """The stride-4 CAM size of an ``(h, w)`` image, ``((h - 1) // 4 + 1, (w - 1) // 4 + 1)``."""
    return (h - 1) // stride + 1, (w - 1) // stride + 1


def normalise(maps: torch.Tensor, subtract_min: bool = False) -> torch.Tensor:
    """``(k, h, w)`` fused maps -> each class divided by its max (+1e-5); with ``subtract_min``, first shifted
    so that its min is 0 (SEAM, seam_affinitynet spec 4.5, clamped at 0 where the reference leaves -1e-5)."""
    if subtract_min:
        maps = (maps - maps.flatten(1).amin(1)[:, None, None]).clamp_min(0)
    return maps / (maps.flatten(1).amax(1)[:, None, None] + 1e-5)


def downsample(high_res: np.ndarray) -> np.ndarray:
    """``(k, H, W)`` -> the bilinear ``(k, H4, W4)`` stride-4 map (for stores that hold only ``high_res``)."""
    x = torch.from_numpy(np.ascontiguousarray(high_res, dtype=np.float32))[None]
    if x.shape[1] == 0:
        return np.zeros((0, *strided_size(*high_res.shape[-2:])), np.float32)
    return F.interpolate(x, strided_size(*high_res.shape[-2:]), mode="bilinear", align_corners=False)[0].numpy()


def _select(cams: Mapping[str, np.ndarray], keys: np.ndarray, path: Path) -> dict[str, np.ndarray]:
    """The maps of ``keys`` (in that order) from one image's store file; a missing class names the file."""
    have = [int(k) for k in cams["keys"]]
    missing = [int(k) for k in keys if int(k) not in have]
    if missing:
        raise UserError(f"{path} has no map of class {missing} (it holds classes {have}): the two stores must "
                        "hold a map of every class of the image's label; remake that store.")
    rows = [have.index(int(k)) for k in keys]
    return {"cam": cams["cam"][rows], "high_res": cams["high_res"][rows]}


def combine_image(path_a: Path, path_b: Path, keys: np.ndarray | None = None, offset: float = 0.0
                  ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """OR and AND of one image's two store files: ``(keys (k,), OR, AND)``, each a dict of ``cam (k, H4, W4)``
    and ``high_res (k, H, W)`` float32.

    ``keys``: the classes to combine (the image's label; a store may hold more, whose extra maps are left
    out). ``None``: both files must hold the same classes. Any mismatch is a ``UserError`` naming the files.
    """
    for path in (path_a, path_b):
        if not path.is_file():
            raise UserError(f"CAM file {path} is missing: both stores must hold every image of the list.")
    a, b = load_cam(path_a), load_cam(path_b)
    if keys is None:
        if not np.array_equal(a["keys"], b["keys"]):
            raise UserError(f"{path_a} holds classes {a['keys'].tolist()} but {path_b} holds "
                            f"{b['keys'].tolist()}: the stores disagree on this image's classes.")
        keys = a["keys"]
    keys = np.asarray(keys, dtype=np.int64)
    a, b = _select(a, keys, path_a), _select(b, keys, path_b)
    for name in ("cam", "high_res"):
        if a[name].shape[1:] != b[name].shape[1:]:
            raise UserError(f"{path_a} and {path_b} differ in {name} size ({a[name].shape[1:]} vs "
                            f"{b[name].shape[1:]}): the stores were made for different images.")
    or_maps, and_maps = {}, {}
    for name in ("cam", "high_res"):
        or_maps[name], and_maps[name] = or_and(a[name], b[name], offset)
    return keys, or_maps, and_maps


def combine_stores(dir_a: str | Path, dir_b: str | Path, ids: Sequence[str], or_dir: str | Path,
                   and_dir: str | Path, offset: float = 0.0, labels: Mapping[str, np.ndarray] | None = None) -> int:
    """Write ``<or_dir>/<id>.npz`` and ``<and_dir>/<id>.npz`` (standard format) for every id of ``ids``;
    ``labels``: multi-hot ``(C,)`` per id, whose classes are combined (else the stores' own keys, which must
    agree). Returns the number of images written."""
    or_dir, and_dir = Path(or_dir), Path(and_dir)
    for image_id in ids:
        keys = None if labels is None else np.nonzero(np.asarray(labels[image_id]))[0]
        keys, or_maps, and_maps = combine_image(Path(dir_a) / f"{image_id}.npz", Path(dir_b) / f"{image_id}.npz",
                                                keys, offset)
        save_cam(or_dir / f"{image_id}.npz", keys, or_maps["cam"], or_maps["high_res"])
        save_cam(and_dir / f"{image_id}.npz", keys, and_maps["cam"], and_maps["high_res"])
    return len(ids)


def store_fingerprint(store: str | Path) -> str:
    """Identity of a store: its producer's fingerprint (``.manifest.json`` of a pipeline step), else the
    names, sizes and modification times of its files (a converted or copied store)."""
    store = Path(store)
    manifest = store / MANIFEST
    if manifest.is_file():
        return manifest.read_text()
    files = sorted(store.glob("*.npz"))
    if not files:
        raise UserError(f"{store} holds no CAM file (<id>.npz): make the store first, or convert one with "
                        "python -m misc.cam_store convert.")
    return files_fingerprint((f.name, f) for f in files)


# ---------------------------------------------------------------------------------------- conversion


def convert_record(record: Mapping, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One unpickled reference record -> ``(keys (k,), cam (k, H4, W4), high_res (k, H, W))``.

    ``irn``: ``{keys, cam, high_res}`` with 0-based foreground keys (``cam`` is derived when absent);
    ``amn``: ``{keys, high_res}`` whose map 0 is background, dropped (and so is a background key 0 when the
    keys count it, the others then being 1-based); ``mctformer``: ``{class index: (H, W) map}``.
    """
    if fmt == "mctformer":
        keys = np.array(sorted(int(k) for k in record), dtype=np.int64)
        high = np.stack([np.asarray(record[k], np.float32) for k in sorted(record, key=int)]) if len(keys) else None
        if high is None:
            raise ValueError("an empty MCTformer record has no map to take the image size from")
        return keys, downsample(high), high
    keys = np.asarray(record["keys"], dtype=np.int64).reshape(-1)
    high = np.asarray(record["high_res"], dtype=np.float32)
    if fmt == "amn":
        high = high[1:]
        if len(keys) == len(high) + 1:
            keys = keys[1:] - 1
    if len(keys) != len(high):
        raise ValueError(f"{len(keys)} keys but {len(high)} maps")
    cam = np.asarray(record["cam"], np.float32) if fmt == "irn" and "cam" in record else downsample(high)
    return keys, cam, high


def convert_store(src: str | Path, out: str | Path, fmt: str, suffix: str = ".npy") -> int:
    """Convert every ``<src>/<id><suffix>`` (a pickled dict of the reference) into ``<out>/<id>.npz``.

    UNPICKLES its inputs (``allow_pickle=True``): run only on files you trust. Returns the count written.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    files = sorted(Path(src).glob(f"*{suffix}"))
    if not files:
        raise UserError(f"{src} holds no *{suffix} file to convert.")
    Path(out).mkdir(parents=True, exist_ok=True)
    for path in files:
        try:
            record = np.load(path, allow_pickle=True).item()  # the one deliberate unpickling (see the module doc)
            keys, cam, high = convert_record(record, fmt)
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{path} is not a {fmt} CAM record ({e}).") from e
        save_cam(Path(out) / f"{path.name[: -len(suffix)]}.npz", keys, cam, high)
    return len(files)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m misc.cam_store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("combine", help="OR and AND stores of two standard stores (no pickles read)")
    c.add_argument("dir_a", help="store A (r; e.g. a CNN's CAMs)")
    c.add_argument("dir_b", help="store B (v; the offset is added to it)")
    c.add_argument("--or_dir", required=True)
    c.add_argument("--and_dir", required=True)
    c.add_argument("--offset", type=float, default=0.0, help="added to B's maps first (spec 5: 0.15 for a ViT)")
    c.add_argument("--ids", default=None, help="id list file (default: every image of store A)")
    v = sub.add_parser("convert", help="reference .npy dicts -> standard .npz files. UNPICKLES the source "
                       "files, which can run code: convert only files you trust (the pipeline never unpickles)")
    v.add_argument("--format", choices=FORMATS, required=True)
    v.add_argument("src")
    v.add_argument("out")
    v.add_argument("--suffix", default=".npy", help="file name ending after the id (the reference: _1.npy)")
    args = p.parse_args(argv)
    try:
        if args.command == "convert":
            n = convert_store(args.src, args.out, args.format, args.suffix)
        else:
            if args.ids:
                ids = [line.strip() for line in Path(args.ids).read_text().splitlines() if line.strip()]
            else:
                ids = sorted(f.stem for f in Path(args.dir_a).glob("*.npz"))
            n = combine_stores(args.dir_a, args.dir_b, ids, args.or_dir, args.and_dir, args.offset)
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    print(f"{n} images written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
