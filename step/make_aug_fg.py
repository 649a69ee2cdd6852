"""Step: build the CDA object bank from the round-1 pseudo masks (spec 10.2) and draw sample composites.

Reads ``args.sem_seg_out_dir`` (pseudo masks of every image in ``args.train_list``), writes the bank to
``args.cda_bank_dir`` (``cda.bank`` layout) and ``<cda_bank_dir>/composites.png``, a grid of composites
with the pasted object outlined, for a visual check. The bank is stamped with a fingerprint of the masks
and the ratio bounds: objects already written are reused on a re-run, and the whole bank is rebuilt when
the masks or the bounds changed.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from cda.bank import INDEX_NAME, build_bank, format_counts, load_bank_index
from cda.composite import Bank, make_composite
from misc import dist
from misc.errors import UserError
from misc.io import atomic_write, save_json
from misc.pipeline import MANIFEST, dir_fingerprint, fingerprint
from voc12.dataset import CLASS_NAMES, VOCLayout, load_cls_labels, read_id_list, read_image

log = logging.getLogger("wsss")

GRID_NAME = "composites.png"
GRID_COLS, GRID_ROWS, CELL = 4, 3, 256
OUTLINE_RGB = (255, 0, 255)  # magenta: rare in natural images


def _reset_if_stale(bank_dir: Path, fp: str) -> None:
    """Delete a bank built from other masks or bounds (its objects would otherwise be reused)."""
    manifest = bank_dir / MANIFEST
    old = json.loads(manifest.read_text())["fingerprint"] if manifest.is_file() else None
    if old == fp:
        return
    stale = list(bank_dir.glob("*/*.npz")) + list(bank_dir.glob(INDEX_NAME))
    if stale:
        log.info("pseudo masks or ratio bounds changed since %s was built: removing %d files", bank_dir, len(stale))
        for f in stale:
            f.unlink()
    save_json(manifest, {"fingerprint": fp})


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


def write_composite_grid(args: argparse.Namespace, ids: list[str], bank: Bank, path: Path) -> None:
    """Draw ``GRID_COLS x GRID_ROWS`` composites of seeded random training images into a PNG at ``path``."""
    labels = load_cls_labels(args.cls_labels)
    rng = np.random.default_rng([args.seed, 1])
    picked = rng.choice(len(ids), size=min(len(ids), GRID_COLS * GRID_ROWS), replace=False)
    grid = Image.new("RGB", (GRID_COLS * CELL, GRID_ROWS * (CELL + 30)))
    layout = VOCLayout(args.voc12_root)
    for k, i in enumerate(sorted(picked)):
        label = labels[ids[i]]
        comp, new_label, paste = make_composite(
            read_image(layout.image(ids[i])), label, bank, rng,
            max_size=args.cda_max_size, max_angle=args.cda_max_angle, mask_order=args.cda_mask_order,
        )  # fmt: skip
        added = np.flatnonzero(new_label > label)
        names = [CLASS_NAMES[c] for c in np.flatnonzero(label > 0.5)]
        cell = _cell(comp, paste, names, CLASS_NAMES[added[0]] if len(added) else None)
        grid.paste(cell, ((k % GRID_COLS) * CELL, (k // GRID_COLS) * (CELL + 30)))
    with atomic_write(path) as f:
        grid.save(f, format="PNG")


def run(args: argparse.Namespace) -> None:
    if dist.is_main():
        ids = read_id_list(args.train_list)
        mask_dir = Path(args.sem_seg_out_dir)
        missing = [i for i in ids if not (mask_dir / f"{i}.png").is_file()]
        if missing:
            raise UserError(
                f"round-1 pseudo masks for {len(missing)} of {len(ids)} training images are missing in "
                f"{mask_dir} (first: {missing[0]}.png): run make_sem_seg_labels with infer_list = train_list first."
            )
        bank_dir = Path(args.cda_bank_dir)
        fp = fingerprint(
            masks=dir_fingerprint(mask_dir, "make_sem_seg_labels"), lo=args.cda_min_ratio, hi=args.cda_max_ratio
        )
        _reset_if_stale(bank_dir, fp)
        counts = build_bank(
            args.voc12_root, ids, mask_dir, bank_dir, min_ratio=args.cda_min_ratio, max_ratio=args.cda_max_ratio
        )
        log.info("make_aug_fg: object bank %s -> %s", format_counts(counts), bank_dir)
        if sum(counts.values()) == 0:
            log.warning("the object bank is empty: CDA composites will equal the original images")
        write_composite_grid(args, ids, load_bank_index(bank_dir), bank_dir / GRID_NAME)
        log.info("make_aug_fg: sample composites -> %s", bank_dir / GRID_NAME)
    dist.barrier()
