"""MS COCO 2014 in the layout weakly supervised segmentation work uses (and the COCO demo, ``voc12.demo``).

``train2014/<id>.jpg``, ``val2014/<id>.jpg``, semantic masks ``SegmentationClass/{train2014,val2014}/<id>.png``
(palette or grey PNG: 0 background, class ``c`` as ``c + 1``, 255 void), optional ``ImageSets/<split>.txt``.

Image-level labels are derived from the masks. ``annotations/instances_{train,val}2014.json`` is not read:
``DatasetInfo.derive_labels`` receives only the file that ``label_source`` named, not the image id, so one
JSON shared by every image of a split cannot be looked up per image through it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dataset.base import DatasetInfo
from misc.errors import UserError

SPLIT_FOLDERS = ("train2014", "val2014")
# COCO file stems name their folder: COCO_train2014_000000000009 lives in train2014/.
_SPLIT_PREFIX = re.compile(r"COCO_([a-z]+\d{4})_")


class COCO14(DatasetInfo):
    """COCO 2014: the 80 thing classes in COCO's category order (ids 1..90 with gaps renumbered 0..79)."""

    name = "coco14"
    class_names = (
        "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
        "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
        "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
        "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
        "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
        "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
        "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
        "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
        "teddy bear", "hair drier", "toothbrush",
    )  # fmt: skip
    has_background = True
    default_lists = {"train_list": ("train",), "val_list": ("val",), "infer_list": ("train",),
                     "eval_list": ("train",), "test_list": ("test",)}
    root_flag = "--data_root"

    def __init__(self, root: str | os.PathLike, max_side: int | None = None) -> None:
        super().__init__(root, max_side)
        self._folder_cache: dict[str, str] = {}

    def check(self) -> COCO14:
        if not any((self.root / d).is_dir() for d in SPLIT_FOLDERS):
            what = "does not exist" if not self.root.exists() else "does not look like COCO 2014"
            raise UserError(
                f"dataset root {self.root} {what}: expected train2014/ and/or val2014/ (with masks in "
                "SegmentationClass/train2014/, SegmentationClass/val2014/) inside it; pass "
                "--dataset coco14 --data_root .../coco2014."
            )
        return self

    def split_folder(self, image_id: str) -> str:
        """``train2014`` or ``val2014`` (or the folder the id's ``COCO_<split>_`` prefix names).

        An id without the prefix is looked up in train2014/ then val2014/ (image or mask present) and the
        answer cached; one found in neither is placed in train2014/ (not cached), so errors name that path.
        """
        m = _SPLIT_PREFIX.match(image_id)
        if m:
            return m.group(1)
        if image_id not in self._folder_cache:
            found = next((f for f in SPLIT_FOLDERS if self._image_in(f, image_id).is_file()
                          or self._mask_in(f, image_id).is_file()), None)
            if found is None:
                return SPLIT_FOLDERS[0]
            self._folder_cache[image_id] = found
        return self._folder_cache[image_id]

    def _image_in(self, folder: str, image_id: str) -> Path:
        return self.root / folder / f"{image_id}.jpg"

    def _mask_in(self, folder: str, image_id: str) -> Path:
        return self.root / "SegmentationClass" / folder / f"{image_id}.png"

    def image(self, image_id: str) -> Path:
        return self._image_in(self.split_folder(image_id), image_id)

    def seg_class(self, image_id: str) -> Path:
        return self._mask_in(self.split_folder(image_id), image_id)

    def list_path(self, split: str, cache_dir: str | os.PathLike) -> Path | None:
        """``ImageSets/<split>.txt`` if the folder has it; else for train/val the stems of the split's masks
        (else of its images), sorted (``DatasetInfo.own_or_scanned_list``); None for other splits."""
        if split not in ("train", "val"):
            return None

        def scan() -> list[str]:
            folder = f"{split}2014"
            ids = sorted(p.stem for p in (self.root / "SegmentationClass" / folder).glob("*.png"))
            return ids or sorted(p.stem for p in (self.root / folder).glob("*.jpg"))

        return self.own_or_scanned_list(split, cache_dir, scan)
