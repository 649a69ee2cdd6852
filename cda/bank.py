"""CDA object bank (spec 10.2): single-class objects cut out of the round-1 pseudo masks.

Layout of ``bank_dir``::

    <bank_dir>/<class name>/<image id>.npz   img uint8 (h, w, 3) RGB crop, seg uint8 (h, w) in {0, c+1}
    <bank_dir>/index.json                    {"<c>": ["<class name>/<id>.npz", ...]} for every class c, sorted

The index is written last, so a bank whose index exists is complete; ``load_bank_index`` additionally
checks that every listed file is present (a stale index from another bank fails loudly, spec 10.6 bug 4).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset.base import DatasetInfo
from misc.errors import UserError
from misc.io import atomic_write, load_png, save_json

INDEX_NAME = "index.json"

Box = tuple[int, int, int, int]


def select_object(mask: np.ndarray, num_classes: int, min_ratio: float = 0.1,
                  max_ratio: float = 0.7) -> tuple[int, Box] | None:
    """Apply the reference selection rule to one pseudo mask.

    Args:
        mask: uint8 (H, W) pseudo mask, 0 = background, c+1 = class c (``c < num_classes``).
        min_ratio, max_ratio: inclusive bounds on the foreground fraction #(mask != 0) / (H*W).

    Returns:
        ``(c, (top, left, bottom, right))`` with 0-based class ``c`` and the tight box of all non-zero
        pixels (bottom/right exclusive; it may enclose several blobs of the class), or ``None`` when the
        mask does not hold exactly the two values {0, c+1} or the ratio is out of bounds.
    """
    values = np.unique(mask)
    # Exactly background plus one class; a void value (255) or a second class rejects the image.
    if len(values) != 2 or values[0] != 0 or not 1 <= values[1] <= num_classes:
        return None
    fg = mask != 0
    ratio = fg.sum() / fg.size
    if not min_ratio <= ratio <= max_ratio:
        return None
    rows = np.flatnonzero(fg.any(axis=1))
    cols = np.flatnonzero(fg.any(axis=0))
    return int(values[1]) - 1, (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def _rel_path(info: DatasetInfo, c: int, image_id: str) -> str:
    return f"{info.class_names[c].replace(' ', '_')}/{image_id}.npz"


def save_object(path: str | os.PathLike, img: np.ndarray, seg: np.ndarray) -> None:
    """Write one bank entry: img uint8 (h, w, 3), seg uint8 (h, w)."""
    with atomic_write(path) as f:
        np.savez(f, img=np.asarray(img, dtype=np.uint8), seg=np.asarray(seg, dtype=np.uint8))


def load_object(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one bank entry: ``(img uint8 (h, w, 3), seg uint8 (h, w))``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["img"], data["seg"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"bank object {path} is unreadable ({e}): delete it and re-run make_aug_fg.") from e


def build_bank(
    info: DatasetInfo,
    ids: Sequence[str],
    pseudo_mask_dir: str | os.PathLike,
    bank_dir: str | os.PathLike,
    *,
    min_ratio: float = 0.1,
    max_ratio: float = 0.7,
    progress: bool = True,
) -> dict[int, int]:
    """Cut every selected object out of its image and write the bank plus its index.

    Args:
        info: the dataset (images, class names).
        ids: image ids whose pseudo masks ``<pseudo_mask_dir>/<id>.png`` are scanned.
        bank_dir: output directory; objects already there are kept (resumable), the index is rewritten.

    Returns:
        ``{c: number of objects}`` for every class c.
    """
    bank_dir = Path(bank_dir)
    info.check()
    index: dict[int, list[str]] = {c: [] for c in range(info.num_classes)}
    for image_id in tqdm(ids, desc="make_aug_fg", disable=not progress):
        mask = load_png(Path(pseudo_mask_dir) / f"{image_id}.png")
        picked = select_object(mask, info.num_classes, min_ratio, max_ratio)
        if picked is None:
            continue
        c, (top, left, bottom, right) = picked
        rel = _rel_path(info, c, image_id)
        # Reading the mask is cheap; only the JPEG decode and the write are skipped on resume.
        if not (bank_dir / rel).is_file():
            img = info.read_photo(image_id)
            if img.shape[:2] != mask.shape:
                raise UserError(
                    f"pseudo mask {Path(pseudo_mask_dir) / f'{image_id}.png'} is {mask.shape}, but the image "
                    f"is {img.shape[:2]}: re-run make_sem_seg_labels."
                )
            save_object(bank_dir / rel, img[top:bottom, left:right], mask[top:bottom, left:right])
        index[c].append(rel)
    save_json(bank_dir / INDEX_NAME, {str(c): sorted(paths) for c, paths in index.items()})
    return {c: len(paths) for c, paths in index.items()}


def load_bank_index(bank_dir: str | os.PathLike, info: DatasetInfo) -> dict[int, list[Path]]:
    """Read ``<bank_dir>/index.json`` as ``{c: [absolute .npz paths]}`` for every class c of ``info``.

    Raises:
        UserError: the bank was never built, or the index lists files that are gone (stale bank).
    """
    bank_dir = Path(bank_dir)
    index_path = bank_dir / INDEX_NAME
    if not index_path.is_file():
        raise UserError(f"CDA object bank index {index_path} is missing: run make_aug_fg first.")
    try:
        raw = json.loads(index_path.read_text())
        bank = {c: [bank_dir / rel for rel in raw.get(str(c), [])] for c in range(info.num_classes)}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise UserError(f"CDA object bank index {index_path} is unreadable ({e}): re-run make_aug_fg.") from e
    missing = [p for paths in bank.values() for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"CDA object bank {bank_dir} is stale: {len(missing)} indexed objects are missing "
            f"(e.g. {missing[0]}): re-run make_aug_fg."
        )
    return bank


def format_counts(counts: dict[int, int], info: DatasetInfo) -> str:
    """One line ``total N: aeroplane 3, bicycle 0, ...`` for logs."""
    per_class = ", ".join(f"{name} {counts.get(c, 0)}" for c, name in enumerate(info.class_names))
    return f"total {sum(counts.values())}: {per_class}"
