"""The torch datasets of the training and inference steps, over any dataset description (``DatasetInfo``).

Determinism: every dataset draws its augmentation from ``np.random.default_rng([seed, epoch, index])``.
Call ``set_epoch(epoch)`` before iterating a loader for that epoch (with ``persistent_workers=False``,
the default, the workers receive the updated dataset); a sample is then augmented identically whatever
the number of loader workers or DDP processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataset.base import DatasetInfo
from misc import imutils
from misc.errors import UserError
from misc.io import load_png
from misc.labels import IGNORE


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


class _IdDataset(torch.utils.data.Dataset):
    """Ids of a checked dataset."""

    def __init__(self, info: DatasetInfo, ids: Sequence[str]) -> None:
        self.info = info.check()
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.ids)


class _SeededDataset(_IdDataset):
    """Adds the per-sample generator ``default_rng([seed, epoch, index])``."""

    def __init__(self, info: DatasetInfo, ids: Sequence[str], seed: int) -> None:
        super().__init__(info, ids)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator:
        """The generator of sample ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])


class ClassificationDataset(_SeededDataset):
    """Images with image-level labels for CAM training (spec 1.6).

    Item: ``{'name': str, 'img': float32 (3, S, S), 'label': float32 (C,)}``. ``augment=False`` gives the
    CAM validation transform (normalize -> top-left crop, no resize or flip).
    """

    def __init__(
        self,
        info: DatasetInfo,
        ids: Sequence[str],
        labels: Mapping[str, np.ndarray],
        *,
        resize_long: tuple[int, int] = (320, 640),
        crop_size: int = 512,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(info, ids, seed)
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
        img = self.transform(self.info.read_photo(name), self.rng(index))
        return {
            "name": name,
            "img": torch.from_numpy(img),
            "label": torch.from_numpy(np.asarray(self.labels[name], dtype=np.float32)),
        }


class ImageDataset(_IdDataset):
    """Raw images for the inference steps: ``{'name', 'img': uint8 (H, W, 3)[, 'label': float32 (C,)]}``.

    Use with ``batch_size=1`` and ``collate_fn=single_collate`` so the numpy arrays pass through as they are.
    """

    def __init__(
        self,
        info: DatasetInfo,
        ids: Sequence[str],
        labels: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__(info, ids)
        self.labels = labels

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.ids[index]
        item: dict[str, Any] = {"name": name, "img": self.info.read_photo(name)}
        if self.labels is not None:
            item["label"] = np.asarray(self.labels[name], dtype=np.float32)
        return item


def single_collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate for ``batch_size=1``: the one item, unchanged (numpy arrays stay numpy)."""
    if len(batch) != 1:
        raise ValueError(f"single_collate needs batch_size=1, got {len(batch)} items")
    return batch[0]


class SegmentationDataset(_SeededDataset):
    """Images with dense labels from ``label_dir/<id><label_suffix>`` (IR labels, pseudo masks), or with
    ``label_dir=None`` the dataset's ground truth (``DatasetInfo.read_training_mask``).

    Training transform (spec 1.6, IRN): joint random scale (image bicubic, label nearest) -> normalize
    -> joint hflip -> joint random crop (image pad 0, label pad 255) -> label rescaled by ``label_scale``
    (nearest; IRN uses 0.25). ``augment=False``: normalize -> top-left crop (same pads) -> label rescale.
    Item: ``{'name', 'img': float32 (3, S, S), 'label': int64 (round(S * label_scale),) * 2}``, plus what
    :meth:`extras` adds. ``photometric(img, rng)``, if given, recolours the scaled uint8 image before it is
    normalised (AGMM's strong augmentation). Subclasses read other labels by overriding :meth:`read_label`
    (``dataset.sparse``: points and scribbles).
    """

    def __init__(
        self,
        info: DatasetInfo,
        ids: Sequence[str],
        label_dir: str | Path | None,
        *,
        crop_size: int,
        scale_range: tuple[float, float] = (0.5, 1.5),
        label_scale: float = 1.0,
        seed: int = 0,
        augment: bool = True,
        label_suffix: str = ".png",
        photometric: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    ) -> None:
        super().__init__(info, ids, seed)
        self.photometric = photometric
        self.label_dir = None if label_dir is None else Path(label_dir)
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.label_scale = label_scale
        self.augment = augment
        self.label_suffix = label_suffix

    def read_label(self, name: str) -> tuple[Path, np.ndarray]:
        """``(path, uint8 (H, W) label map)`` of ``name`` at the working resolution."""
        if self.label_dir is None:
            return self.info.seg_class(name), self.info.read_training_mask(name)
        label_path = self.label_dir / f"{name}{self.label_suffix}"
        return label_path, load_png(label_path)

    def extras(self, name: str, label: np.ndarray) -> dict[str, Any]:
        """Extra item fields computed from the whole (not yet augmented) label map; none by default."""
        return {}

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.ids[index]
        img = self.info.read_photo(name)
        label_path, label = self.read_label(name)
        extras = self.extras(name, label)
        if label.shape != img.shape[:2]:
            raise UserError(
                f"label {label_path} is {label.shape} but image {self.info.image(name)} is {img.shape[:2]}: "
                "the labels were made for a different dataset; re-run the step that wrote them."
            )
        if self.augment:
            rng = self.rng(index)
            img, label = imutils.random_scale([img, label], self.scale_range, rng, orders=(3, 0))
            if self.photometric is not None:
                img = self.photometric(img, rng)
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
            **extras,
        }
