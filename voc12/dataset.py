"""PASCAL VOC 2012 layout, id lists, image-level labels, image reading and the torch datasets (spec 1).

Determinism: every dataset draws its augmentation from ``np.random.default_rng([seed, epoch, index])``.
Call ``set_epoch(epoch)`` before iterating a loader for that epoch (with ``persistent_workers=False``,
the default, the workers receive the updated dataset); a sample is then augmented identically whatever
the number of loader workers or DDP processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from misc import imutils
from misc.errors import UserError
from misc.io import atomic_write, load_png

CLASS_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
NUM_CLASSES = 20
IGNORE = 255

SHIPPED_DIR = Path(__file__).resolve().parent / "data"


def _voc_palette() -> np.ndarray:
    """The VOC colour map (256*3,) uint8: the bits of the index are spread over R, G, B from the MSB."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, rgb = i, [0, 0, 0]
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        palette[i] = rgb
    return palette.reshape(-1)


PALETTE = _voc_palette()


def read_id_list(path: str | os.PathLike) -> list[str]:
    """Ids of a list file, one per line, kept as strings (no int32 encoding, spec 1.2)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"id list {path} is missing: pass an existing list file (one image id per line).")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def labels_to_multi_hot(classes: Sequence[int]) -> np.ndarray:
    """0-based class indices -> float32 multi-hot ``(20,)``."""
    y = np.zeros(NUM_CLASSES, dtype=np.float32)
    y[list(classes)] = 1.0
    return y


def load_cls_labels(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read ``id<TAB>1-based class indices`` lines into ``{id: float32 (20,)}``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label file {path} is missing: run the make_cls_labels step first.")
    labels = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, rest = line.partition("\t")
        try:
            classes = [int(t) - 1 for t in rest.split()]
        except ValueError as e:
            raise UserError(f"{path}:{n}: malformed line {line!r} (expected id<TAB>class numbers).") from e
        if any(not 0 <= c < NUM_CLASSES for c in classes):
            raise UserError(f"{path}:{n}: class numbers must lie in 1..{NUM_CLASSES}: {line!r}.")
        labels[name.strip()] = labels_to_multi_hot(classes)
    return labels


def save_cls_labels(path: str | os.PathLike, labels: Mapping[str, np.ndarray]) -> None:
    """Write ``{id: multi-hot (20,)}`` as sorted ``id<TAB>1-based class indices`` lines, atomically."""
    lines = [
        name + "\t" + " ".join(str(int(c) + 1) for c in np.flatnonzero(np.asarray(y) > 0.5))
        for name, y in sorted(labels.items())
    ]
    with atomic_write(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


class VOCLayout:
    """Paths inside a VOC2012-style root (``.../VOCdevkit/VOC2012`` or the demo root)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def check(self) -> VOCLayout:
        """Raise ``UserError`` unless the root exists and holds ``JPEGImages/``; return self."""
        if not (self.root / "JPEGImages").is_dir():
            what = "does not exist" if not self.root.exists() else "does not look like VOC2012"
            raise UserError(
                f"dataset root {self.root} {what}: expected JPEGImages/ (and SegmentationClass/, "
                "Annotations/) inside it; pass --voc12_root .../VOCdevkit/VOC2012, or omit it to use "
                "the embedded demo dataset."
            )
        return self

    def image(self, name: str) -> Path:
        return self.root / "JPEGImages" / f"{name}.jpg"

    def seg_class(self, name: str) -> Path:
        return self.root / "SegmentationClass" / f"{name}.png"

    def seg_class_aug(self, name: str) -> Path:
        return self.root / "SegmentationClassAug" / f"{name}.png"

    def seg_object(self, name: str) -> Path:
        return self.root / "SegmentationObject" / f"{name}.png"

    def annotation(self, name: str) -> Path:
        return self.root / "Annotations" / f"{name}.xml"

    def split_list(self, split: str) -> Path:
        """``ImageSets/Segmentation/<split>.txt``."""
        return self.root / "ImageSets" / "Segmentation" / f"{split}.txt"


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 RGB ``(H, W, 3)`` (grayscale, palette, RGBA and CMYK converted)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} is missing: check --voc12_root and the id list.")
    try:
        with Image.open(path) as img:
            # convert() forces a full decode, so a truncated file fails here and not in a loader worker.
            return np.asarray(img.convert("RGB"))
    except OSError as e:
        raise UserError(f"image {path} is unreadable or corrupt ({e}): replace or remove it.") from e


def cam_train_transform(
    img: np.ndarray, rng: np.random.Generator, resize_long: tuple[int, int] = (320, 640), crop_size: int = 512
) -> np.ndarray:
    """CAM training transform (spec 1.6): uint8 ``(H, W, 3)`` -> float32 ``(3, S, S)``.

    resize_long bicubic -> normalize -> hflip -> random crop (pad 0 = mean colour after normalisation).
    """
    img = imutils.random_resize_long(img, resize_long[0], resize_long[1], rng)
    img = imutils.normalize(img)
    (img,) = imutils.random_lr_flip([img], rng)
    (img,) = imutils.random_crop([img], crop_size, [0.0], rng)
    return imutils.hwc_to_chw(img)


def cam_val_transform(img: np.ndarray, crop_size: int = 512) -> np.ndarray:
    """CAM validation transform (spec 1.6): normalize -> top-left crop; uint8 ``(H, W, 3)`` -> ``(3, S, S)``."""
    return imutils.hwc_to_chw(imutils.top_left_crop(imutils.normalize(img), crop_size, 0.0))


class _VOCDataset(torch.utils.data.Dataset):
    """Ids of a checked VOC root."""

    def __init__(self, root: str | os.PathLike, ids: Sequence[str]) -> None:
        self.layout = VOCLayout(root).check()
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.ids)


class _SeededDataset(_VOCDataset):
    """Adds the per-sample generator ``default_rng([seed, epoch, index])``."""

    def __init__(self, root: str | os.PathLike, ids: Sequence[str], seed: int) -> None:
        super().__init__(root, ids)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator:
        """The generator of sample ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])


class ClassificationDataset(_SeededDataset):
    """Images with image-level labels for CAM training (spec 1.6).

    Item: ``{'name': str, 'img': float32 (3, S, S), 'label': float32 (20,)}``. ``augment=False`` gives the
    CAM validation transform (normalize -> top-left crop, no resize or flip).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        ids: Sequence[str],
        labels: Mapping[str, np.ndarray],
        *,
        resize_long: tuple[int, int] = (320, 640),
        crop_size: int = 512,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(root, ids, seed)
        missing = [i for i in self.ids if i not in labels]
        if missing:
            raise UserError(
                f"{len(missing)} ids have no image-level label (first: {missing[0]}): re-run make_cls_labels."
            )
        self.labels = labels
        self.resize_long = resize_long
        self.crop_size = crop_size
        self.augment = augment

    def transform(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """This dataset's transform of a uint8 ``(H, W, 3)`` image -> float32 ``(3, S, S)``."""
        if self.augment:
            return cam_train_transform(img, rng, self.resize_long, self.crop_size)
        return cam_val_transform(img, self.crop_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.ids[index]
        img = self.transform(read_image(self.layout.image(name)), self.rng(index))
        return {
            "name": name,
            "img": torch.from_numpy(img),
            "label": torch.from_numpy(np.asarray(self.labels[name], dtype=np.float32)),
        }


class ImageDataset(_VOCDataset):
    """Raw images for the inference steps: ``{'name', 'img': uint8 (H, W, 3)[, 'label': float32 (20,)]}``.

    Use with ``batch_size=1`` and ``collate_fn=single_collate`` so the numpy arrays pass through as they are.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        ids: Sequence[str],
        labels: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__(root, ids)
        self.labels = labels

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.ids[index]
        item: dict[str, Any] = {"name": name, "img": read_image(self.layout.image(name))}
        if self.labels is not None:
            item["label"] = np.asarray(self.labels[name], dtype=np.float32)
        return item


def single_collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate for ``batch_size=1``: the one item, unchanged (numpy arrays stay numpy)."""
    if len(batch) != 1:
        raise ValueError(f"single_collate needs batch_size=1, got {len(batch)} items")
    return batch[0]


class SegmentationDataset(_SeededDataset):
    """Images with dense labels from ``label_dir/<id><label_suffix>`` (IR labels, pseudo masks or GT).

    Training transform (spec 1.6, IRN): joint random scale (image bicubic, label nearest) -> normalize
    -> joint hflip -> joint random crop (image pad 0, label pad 255) -> label rescaled by ``label_scale``
    (nearest; IRN uses 0.25). ``augment=False``: normalize -> top-left crop (same pads) -> label rescale.
    Item: ``{'name', 'img': float32 (3, S, S), 'label': int64 (round(S * label_scale),) * 2}``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        ids: Sequence[str],
        label_dir: str | os.PathLike,
        *,
        crop_size: int,
        scale_range: tuple[float, float] = (0.5, 1.5),
        label_scale: float = 1.0,
        seed: int = 0,
        augment: bool = True,
        label_suffix: str = ".png",
    ) -> None:
        super().__init__(root, ids, seed)
        self.label_dir = Path(label_dir)
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.label_scale = label_scale
        self.augment = augment
        self.label_suffix = label_suffix

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.ids[index]
        img = read_image(self.layout.image(name))
        label_path = self.label_dir / f"{name}{self.label_suffix}"
        label = load_png(label_path)
        if label.shape != img.shape[:2]:
            raise UserError(
                f"label {label_path} is {label.shape} but image {self.layout.image(name)} is {img.shape[:2]}: "
                "the labels were made for a different dataset; re-run the step that wrote them."
            )
        if self.augment:
            rng = self.rng(index)
            img, label = imutils.random_scale([img, label], self.scale_range, rng, orders=(3, 0))
            img, label = imutils.random_lr_flip([imutils.normalize(img), label], rng)
            img, label = imutils.random_crop([img, label], self.crop_size, [0.0, IGNORE], rng)
        else:
            img = imutils.top_left_crop(imutils.normalize(img), self.crop_size, 0.0)
            label = imutils.top_left_crop(label, self.crop_size, IGNORE)
        label = imutils.rescale(label, self.label_scale, 0)
        return {
            "name": name,
            "img": torch.from_numpy(imutils.hwc_to_chw(img)),
            "label": torch.from_numpy(label.astype(np.int64)),
        }
