"""Cityscapes (fine annotations), with the 19 evaluation classes (trainIds) and no background class.

``leftImg8bit/<split>/<city>/<id>_leftImg8bit.png`` and ``gtFine/<split>/<city>/<id>_gtFine_labelTrainIds.png``
(trainIds 0..18, 255 ignore; written by cityscapesscripts' ``createTrainIdLabelImgs``). Ids are
``<city>_<seq>_<frame>``, e.g. ``aachen_000000_000019``. A folder with only the ``_gtFine_labelIds.png``
masks works too: ``read_mask`` and the image-level labels convert those with ``LABEL_ID_TO_TRAIN_ID``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dataset.base import IGNORE, DatasetInfo
from misc.errors import UserError
from misc.io import load_png

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"

# labelId -> trainId of the evaluated labels (cityscapesscripts' labels.py); the other labelIds of 0..33, and
# any value above, are not evaluated and become 255.
_TRAIN_ID_OF_LABEL_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                         26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE, dtype=np.uint8)  # lookup table indexed by labelId
LABEL_ID_TO_TRAIN_ID[list(_TRAIN_ID_OF_LABEL_ID)] = list(_TRAIN_ID_OF_LABEL_ID.values())

# The official colours of trainIds 0..18 (cityscapesscripts' labels.py).
_TRAIN_ID_COLOURS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes labelIds uint8 ``(H, W)`` -> trainIds uint8 ``(H, W)`` (255 for every unevaluated label)."""
    return LABEL_ID_TO_TRAIN_ID[label_ids]


class Cityscapes(DatasetInfo):
    """Cityscapes: masks store class ``c`` as ``c`` (no background), 255 ignore."""

    name = "cityscapes"
    class_names = (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
        "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
    )  # fmt: skip
    has_background = False
    default_lists = {"train_list": ("train",), "val_list": ("val",), "infer_list": ("train",),
                     "eval_list": ("val",), "test_list": ("test",)}
    root_flag = "--data_root"

    def __init__(self, root: str | os.PathLike, max_side: int | None = None) -> None:
        super().__init__(root, max_side)
        self._split_cache: dict[str, str] = {}

    @property
    def palette(self) -> np.ndarray:
        """(256*3,) uint8: the official trainId colours for 0..18, black for 255 and every other value."""
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[: len(_TRAIN_ID_COLOURS)] = _TRAIN_ID_COLOURS
        return palette.reshape(-1)

    def check(self) -> Cityscapes:
        if not (self.root / "leftImg8bit").is_dir():
            what = "does not exist" if not self.root.exists() else "does not look like Cityscapes"
            raise UserError(
                f"dataset root {self.root} {what}: expected leftImg8bit/ (and gtFine/) inside it; pass "
                "--dataset cityscapes --data_root .../cityscapes."
            )
        return self

    def split_of(self, image_id: str) -> str:
        """The split (train, val, test) whose folders hold ``image_id``'s image or mask, cached; an id found in
        none is placed in train (not cached), so errors name that path."""
        if image_id not in self._split_cache:
            found = next((s for s in SPLITS if any(p.is_file() for p in self._files(s, image_id))), None)
            if found is None:
                return SPLITS[0]
            self._split_cache[image_id] = found
        return self._split_cache[image_id]

    def _files(self, split: str, image_id: str) -> tuple[Path, Path, Path]:
        """Image, trainIds mask and labelIds mask of ``image_id`` if it were in ``split``."""
        city = image_id.split("_", 1)[0]
        gt = self.root / "gtFine" / split / city
        return (self.root / "leftImg8bit" / split / city / f"{image_id}{IMAGE_SUFFIX}",
                gt / f"{image_id}{TRAIN_IDS_SUFFIX}", gt / f"{image_id}{LABEL_IDS_SUFFIX}")

    def image(self, image_id: str) -> Path:
        return self._files(self.split_of(image_id), image_id)[0]

    def seg_class(self, image_id: str) -> Path:
        """The labelTrainIds mask. It may be absent where only labelIds exist: evaluate with ``read_mask``."""
        return self._files(self.split_of(image_id), image_id)[1]

    def label_ids(self, image_id: str) -> Path:
        """The labelIds mask (Cityscapes' 34 label ids), the source of trainIds when those were not generated."""
        return self._files(self.split_of(image_id), image_id)[2]

    def has_mask(self, image_id: str) -> bool:
        return self.seg_class(image_id).is_file() or self.label_ids(image_id).is_file()

    def load_mask(self, image_id: str) -> np.ndarray:
        """trainIds uint8 ``(H, W)``: the labelTrainIds PNG, else the labelIds PNG converted."""
        return self._read_train_ids(self.label_source(image_id))

    def training_mask_file(self, image_id: str) -> Path:
        return self.label_source(image_id) if self.has_mask(image_id) else self.seg_class(image_id)

    def label_source(self, image_id: str) -> Path:
        """The labelTrainIds mask, else the labelIds mask (``UserError`` naming both if neither exists)."""
        train_ids, label_ids = self.seg_class(image_id), self.label_ids(image_id)
        for path in (train_ids, label_ids):
            if path.is_file():
                return path
        raise UserError(f"no ground truth for {image_id}: neither {train_ids} nor {label_ids} exists (download "
                        "gtFine_trainvaltest.zip and unpack it into the dataset root).")

    def derive_labels(self, path: Path) -> np.ndarray:
        return self.multi_hot(self.classes_in_mask(self._read_train_ids(path), path))

    @staticmethod
    def _read_train_ids(path: Path) -> np.ndarray:
        mask = load_png(path)
        return label_ids_to_train_ids(mask) if path.name.endswith(LABEL_IDS_SUFFIX) else mask

    def list_path(self, split: str, cache_dir: str | os.PathLike) -> Path | None:
        """``ImageSets/<split>.txt`` if the folder has it; else the ids of ``leftImg8bit/<split>/*/`` sorted
        (``DatasetInfo.own_or_scanned_list``); None when the split has no images."""

        def scan() -> list[str]:
            images = (self.root / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}")
            return sorted(p.name[: -len(IMAGE_SUFFIX)] for p in images)

        return self.own_or_scanned_list(split, cache_dir, scan)
