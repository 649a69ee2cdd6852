"""PASCAL VOC 2012 (and any folder in its layout: the demo, a subset of VOC photos)."""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from dataset.base import DatasetInfo, read_id_list
from misc.errors import UserError
from misc.io import load_png

log = logging.getLogger("wsss")

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "voc12" / "data"


class VOC12(DatasetInfo):
    """``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (0 bg, c+1, 255 void), ``SegmentationObject/``,
    ``Annotations/<id>.xml``, ``SegmentationClassAug/`` (SBD, optional), ``ImageSets/Segmentation/<split>.txt``.

    Image-level labels: the shipped ``voc12/data/cls_labels.tsv`` (VOC train_aug + val), else derived from
    ``Annotations/<id>.xml`` (every object name that is a VOC class, difficult and truncated ones included,
    as the reference did), else from ``SegmentationClassAug`` / ``SegmentationClass`` masks.
    """

    name = "voc12"
    class_names = (
        "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
        "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
        "tvmonitor",
    )  # fmt: skip
    # SBD's train_aug when the folder has it (or is VOC itself), else the folder's own train split.
    default_lists = {"train_list": ("train_aug", "train"), "val_list": ("val",), "infer_list": ("train",),
                     "eval_list": ("train",), "test_list": ("test",)}
    root_flag = "--voc12_root"

    def check(self) -> VOC12:
        if not (self.root / "JPEGImages").is_dir():
            what = "does not exist" if not self.root.exists() else "does not look like VOC2012"
            raise UserError(
                f"dataset root {self.root} {what}: expected JPEGImages/ (and SegmentationClass/, Annotations/) "
                "inside it; pass --voc12_root .../VOCdevkit/VOC2012, or omit it to use the embedded demo dataset."
            )
        return self

    def image(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def seg_class(self, image_id: str) -> Path:
        return self.root / "SegmentationClass" / f"{image_id}.png"

    def seg_class_aug(self, image_id: str) -> Path:
        return self.root / "SegmentationClassAug" / f"{image_id}.png"

    def seg_object(self, image_id: str) -> Path:
        return self.root / "SegmentationObject" / f"{image_id}.png"

    def training_mask_file(self, image_id: str) -> Path:
        """SBD's ``SegmentationClassAug`` mask (it covers train_aug) when present, else ``SegmentationClass``."""
        aug = self.seg_class_aug(image_id)
        return aug if aug.is_file() else self.seg_class(image_id)

    def has_training_mask(self, image_id: str) -> bool:
        return self.training_mask_file(image_id).is_file()

    def load_training_mask(self, image_id: str) -> np.ndarray:
        return load_png(self.training_mask_file(image_id))

    def annotation(self, image_id: str) -> Path:
        return self.root / "Annotations" / f"{image_id}.xml"

    def split_list(self, split: str) -> Path:
        """The folder's own ``ImageSets/Segmentation/<split>.txt``."""
        return self.root / "ImageSets" / "Segmentation" / f"{split}.txt"

    def list_path(self, split: str, cache_dir: str | os.PathLike) -> Path | None:
        """The folder's own list, else the shipped VOC list when this folder holds its images (VOC itself).

        The shipped lists name VOC's ids; another VOC-layout folder without the list has no such split.
        The test list is taken as shipped without the check: its images come in a separate package.
        """
        own = self.split_list(split)
        if own.is_file():
            return own
        shipped = SHIPPED_DIR / f"{split}.txt"
        if not shipped.is_file():
            return None
        if split == "test" or all(self.image(i).is_file() for i in read_id_list(shipped)):
            return shipped
        return None

    def shipped_labels(self) -> Path:
        return SHIPPED_DIR / "cls_labels.tsv"

    def label_source(self, image_id: str) -> Path:
        """XML, else SegmentationClassAug, else SegmentationClass."""
        for path in (self.annotation(image_id), self.seg_class_aug(image_id), self.seg_class(image_id)):
            if path.is_file():
                return path
        raise UserError(
            f"no image-level label for {image_id}: it is not in the shipped labels and {self.root} has neither "
            f"Annotations/{image_id}.xml nor a SegmentationClass(Aug) mask for it."
        )

    def derive_labels(self, path: Path) -> np.ndarray:
        if path.suffix != ".xml":
            return super().derive_labels(path)
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as e:
            raise UserError(f"annotation {path} is not valid XML ({e}): replace it or delete it.") from e
        names = {(obj.findtext("name") or "").strip() for obj in root.iter("object")}
        return self.multi_hot([self.class_names.index(n) for n in names if n in self.class_names])
