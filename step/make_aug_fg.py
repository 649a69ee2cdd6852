"""Step: build the CDA object bank from the round-1 pseudo masks (spec 10.2) and draw sample composites.

Reads ``args.bank_masks_dir`` (the baseline round's pseudo masks of every image in ``args.train_list``),
writes the bank to ``args.cda_bank_dir`` (``cda.bank`` layout) and ``<cda_bank_dir>/composites.png``, a grid
of composites with the pasted object outlined, for a visual check. The bank is stamped with a fingerprint of the masks
and the ratio bounds: objects already written are reused on a re-run, and the whole bank is rebuilt when
the masks or the bounds changed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

import dataset
from cda.bank import INDEX_NAME, build_bank, format_counts, load_bank_index
from cda.composite import Bank, make_composite
from dataset.base import DatasetInfo, read_id_list
from dataset.labels import load_cls_labels
from misc import dist
from misc.io import atomic_write
from misc.pipeline import dir_fingerprint, fingerprint, prepare_output_dir, require_files

log = logging.getLogger("wsss")

GRID_NAME = "composites.png"
GRID_COLS, GRID_ROWS, CELL = 4, 3, 256
OUTLINE_RGB = (255, 0, 255)  # magenta: rare in natural images


def _cell(img: np.ndarray, paste: np.ndarray, names: list[str], pasted: str | None) -> Image.Image:
    """One grid cell: the composite letterboxed into CELL x CELL, the paste outline, the label text."""
    h, w = img.shape[:2]
    s = CELL / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    small = np.array(Image.fromarray(img).resize(size, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(paste.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    # A 2-pixel band inside the mask's border stays visible after the downscale.
    outline = mask & ~ndimage.binary_erosion(mask, iterations=2, border_value=0)
    small[outline] = OUTLINE_RGB
    cell = Image.new("RGB", (CELL, CELL + 30))
    cell.paste(Image.fromarray(small), ((CELL - size[0]) // 2, (CELL - size[1]) // 2))
    draw = ImageDraw.Draw(cell)
    draw.text((4, CELL + 2), ", ".join(names) or "(no label)", fill=(255, 255, 255))
    draw.text((4, CELL + 15), f"+ {pasted}" if pasted else "(nothing pasted)", fill=OUTLINE_RGB)
    return cell


def write_composite_grid(args: argparse.Namespace, info: DatasetInfo, ids: list[str], bank: Bank, path: Path) -> None:
    """Draw ``GRID_COLS x GRID_ROWS`` composites of seeded random training images into a PNG at ``path``."""
    labels = load_cls_labels(args.cls_labels, info.num_classes)
    rng = np.random.default_rng([args.seed, 1])
    picked = rng.choice(len(ids), size=min(len(ids), GRID_COLS * GRID_ROWS), replace=False)
    grid = Image.new("RGB", (GRID_COLS * CELL, GRID_ROWS * (CELL + 30)))
    for k, i in enumerate(sorted(picked)):
        label = labels[ids[i]]
        comp, new_label, paste = make_composite(
            info.read_photo(ids[i]), label, bank, rng,
            max_size=args.cda_max_size, max_angle=args.cda_max_angle, mask_order=args.cda_mask_order,
        )  # fmt: skip
        added = np.flatnonzero(new_label > label)
        names = [info.class_names[c] for c in np.flatnonzero(label > 0.5)]
        cell = _cell(comp, paste, names, info.class_names[added[0]] if len(added) else None)
        grid.paste(cell, ((k % GRID_COLS) * CELL, (k // GRID_COLS) * (CELL + 30)))
    with atomic_write(path) as f:
        grid.save(f, format="PNG")


def run(args: argparse.Namespace) -> None:
    info = dataset.from_args(args)
    ids = read_id_list(args.train_list)
    mask_dir = Path(args.bank_masks_dir)
    require_files(mask_dir, ids, ".png", "make_sem_seg_labels",
                  "run the baseline round's make_sem_seg_labels with infer_list = train_list first")
    fp = fingerprint(masks=dir_fingerprint(mask_dir, "make_sem_seg_labels"), lo=args.cda_min_ratio,
                     hi=args.cda_max_ratio)
    # A bank built from other masks or bounds is deleted: its objects would otherwise be reused.
    bank_dir = prepare_output_dir(args.cda_bank_dir, fp, "*/*.npz", INDEX_NAME)
    if dist.is_main():
        counts = build_bank(info, ids, mask_dir, bank_dir, min_ratio=args.cda_min_ratio, max_ratio=args.cda_max_ratio)
        log.info("make_aug_fg: object bank %s -> %s", format_counts(counts, info), bank_dir)
        if sum(counts.values()) == 0:
            log.warning("the object bank is empty: CDA composites will equal the original images")
        write_composite_grid(args, info, ids, load_bank_index(bank_dir, info), bank_dir / GRID_NAME)
        log.info("make_aug_fg: sample composites -> %s", bank_dir / GRID_NAME)
    dist.barrier()
