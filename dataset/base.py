"""What the pipeline knows about a dataset, in one object: classes, label encoding, folders, lists, tags.

A dataset description (:class:`DatasetInfo` subclass, one per dataset in this package) is the only place
that names classes or counts them. Steps get it with ``dataset.from_args(args)`` and ask it for paths
(``image(id)``, ``seg_class(id)``), the class names and counts, the palette and the default id lists.

Label encoding: class ``c`` (0-based, ``c < num_classes``) is the image-level tag index. In masks a dataset
with a background class stores background as 0 and class ``c`` as ``c + 1``; one without (Cityscapes)
stores ``c``. ``ignore`` (255) is void either way. ``num_labels`` is the number of mask values a
segmenter predicts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from misc.errors import UserError
from misc.imutils import rescale
from misc.io import atomic_write, load_png
from misc.labels import IGNORE


def voc_palette() -> np.ndarray:
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


def read_id_list(path: str | os.PathLike) -> list[str]:
    """Ids of a list file, one per line, kept as strings (no int32 encoding, spec 1.2)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"id list {path} is missing: pass an existing list file (one image id per line).")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def write_id_list(path: str | os.PathLike, ids: Sequence[str]) -> None:
    with atomic_write(path, "w") as f:
        f.write("".join(f"{i}\n" for i in ids))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 RGB ``(H, W, 3)`` (grayscale, palette, RGBA and CMYK converted)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} is missing: check the dataset root and the id list.")
    try:
        with Image.open(path) as img:
            # convert() forces a full decode, so a truncated file fails here and not in a loader worker.
            return np.asarray(img.convert("RGB"))
    except OSError as e:
        raise UserError(f"image {path} is unreadable or corrupt ({e}): replace or remove it.") from e


class DatasetInfo:
    """One dataset: subclasses set the class attributes and the layout methods.

    Attributes:
        name: the ``--dataset`` value.
        class_names: the image-level classes, 0-based, in the order of the tags and masks.
        has_background: masks store background as 0 and class ``c`` as ``c + 1``; else class ``c`` as ``c``.
        default_lists: pipeline role (``train_list``, ``val_list``, ``infer_list``, ``eval_list``,
            ``test_list``) -> split names to try in order (``list_path`` resolves them).
        root_flag: the command-line flag that sets this dataset's root, for error messages.
    """

    name: ClassVar[str]
    class_names: ClassVar[tuple[str, ...]]
    has_background: ClassVar[bool] = True
    ignore: ClassVar[int] = IGNORE
    default_lists: ClassVar[Mapping[str, tuple[str, ...]]]
    root_flag: ClassVar[str] = "--data_root"

    def __init__(self, root: str | os.PathLike, max_side: int | None = None) -> None:
        self.root = Path(root)
        self.max_side = max_side

    def fit(self, array: np.ndarray, order: int) -> np.ndarray:
        """Scale a photo (``order`` 3, bicubic) or label map (0, nearest) ``(H, W[, 3])`` down so that its long
        side is at most ``max_side`` (``--max_image_side``): the working resolution of every step, which bounds
        their memory on huge photos. Unchanged when it fits; a photo and its masks get the same size."""
        if self.max_side is None or max(array.shape[:2]) <= self.max_side:
            return array
        return rescale(array, self.max_side / max(array.shape[:2]), order)

    def read_photo(self, image_id: str) -> np.ndarray:
        """The photo of ``image_id``, uint8 RGB ``(H, W, 3)`` at the working resolution (:meth:`fit`)."""
        return self.fit(read_image(self.image(image_id)), 3)

    # ---- classes and label encoding

    @property
    def num_classes(self) -> int:
        """Image-level classes (the CAM network's outputs)."""
        return len(self.class_names)

    @property
    def num_labels(self) -> int:
        """Mask values other than ``ignore`` (a segmenter's outputs): classes plus background if any."""
        return self.num_classes + int(self.has_background)

    @property
    def label_names(self) -> tuple[str, ...]:
        """Name of every mask value ``0..num_labels-1``."""
        return ("background", *self.class_names) if self.has_background else self.class_names

    @property
    def palette(self) -> np.ndarray:
        """(256*3,) uint8 colours of the mask values, for palette PNGs."""
        return voc_palette()

    def multi_hot(self, classes: Sequence[int]) -> np.ndarray:
        """0-based class indices -> float32 multi-hot ``(num_classes,)``."""
        y = np.zeros(self.num_classes, dtype=np.float32)
        y[list(classes)] = 1.0
        return y

    def classes_in_mask(self, mask: np.ndarray, source: str | os.PathLike) -> list[int]:
        """0-based classes present in a mask; ``UserError`` naming ``source`` for values outside the encoding."""
        values = set(np.unique(mask).tolist()) - {self.ignore}
        bad = sorted(v for v in values if v >= self.num_labels)
        if bad:
            raise UserError(f"mask {source} has values {bad[:5]} outside 0..{self.num_labels - 1} and "
                            f"{self.ignore}: not a {self.name} mask (check --dataset and the root).")
        offset = int(self.has_background)
        return sorted(v - offset for v in values if v >= offset)

    # ---- folders

    def check(self) -> DatasetInfo:
        """Raise ``UserError`` unless the root looks like this dataset; return self."""
        raise NotImplementedError

    def image(self, image_id: str) -> Path:
        raise NotImplementedError

    def seg_class(self, image_id: str) -> Path:
        """The ground-truth semantic mask of ``image_id`` (values in this dataset's encoding)."""
        raise NotImplementedError

    def seg_class_aug(self, image_id: str) -> Path | None:
        """Extra ground truth covering more training images (VOC's SBD masks), if the dataset has any."""
        return None

    def seg_object(self, image_id: str) -> Path | None:
        """The instance mask of ``image_id`` (VOC ``SegmentationObject`` encoding), if the dataset has any."""
        return None

    def has_mask(self, image_id: str) -> bool:
        """Whether ``read_mask(image_id)`` has a file to read."""
        return self.seg_class(image_id).is_file()

    def read_mask(self, image_id: str) -> np.ndarray:
        """The ground-truth mask of ``image_id`` as uint8 ``(H, W)`` in this dataset's encoding, at the working
        resolution (:meth:`fit`)."""
        return self.fit(self.load_mask(image_id), 0)

    def load_mask(self, image_id: str) -> np.ndarray:
        """``read_mask`` at the file's own size (what a dataset with another encoding overrides)."""
        return load_png(self.seg_class(image_id))

    def read_instances(self, image_id: str) -> np.ndarray:
        """The instance mask (``seg_object``) of ``image_id`` at the working resolution."""
        return self.fit(load_png(self.seg_object(image_id)), 0)

    def training_mask_file(self, image_id: str) -> Path:
        """The file ``load_training_mask(image_id)`` reads (for fingerprints and error messages)."""
        return self.seg_class(image_id)

    def has_training_mask(self, image_id: str) -> bool:
        """Whether ``read_training_mask(image_id)`` has a file to read."""
        return self.has_mask(image_id)

    def read_training_mask(self, image_id: str) -> np.ndarray:
        """The ground truth a fully supervised segmenter trains on (the upper bound), at the working resolution."""
        return self.fit(self.load_training_mask(image_id), 0)

    def load_training_mask(self, image_id: str) -> np.ndarray:
        """``read_training_mask`` at the file's size: ``load_mask`` unless the dataset has extra training
        masks (VOC's SBD)."""
        return self.load_mask(image_id)

    # ---- lists and image-level labels

    def list_path(self, split: str, cache_dir: str | os.PathLike) -> Path | None:
        """The id list of ``split`` (the dataset's own, else one shipped or generated into ``cache_dir``),
        or None when the dataset has no such split."""
        raise NotImplementedError

    def own_or_scanned_list(self, split: str, cache_dir: str | os.PathLike,
                            scan: Callable[[], list[str]]) -> Path | None:
        """The folder's own ``ImageSets/<split>.txt``, else the ids ``scan()`` finds written to
        ``<cache_dir>/<name>/<split>.txt`` (None if it finds none). The scan runs on every call, so a list
        never outlives a change of the folder; the file is rewritten only when its ids change."""
        own = self.root / "ImageSets" / f"{split}.txt"
        if own.is_file():
            return own
        ids = scan()
        if not ids:
            return None
        cached = Path(cache_dir) / self.name / f"{split}.txt"
        if not cached.is_file() or read_id_list(cached) != ids:
            write_id_list(cached, ids)
        return cached

    def shipped_labels(self) -> Path | None:
        """A shipped ``id<TAB>1-based classes`` TSV of image-level labels, if any."""
        return None

    def label_source(self, image_id: str) -> Path:
        """The file the image-level labels of ``image_id`` are derived from (``UserError`` if none)."""
        path = self.seg_class(image_id)
        if path.is_file():
            return path
        raise UserError(f"no image-level label for {image_id}: {path} is missing, and {self.name} derives the "
                        "labels from the masks.")

    def derive_labels(self, path: Path) -> np.ndarray:
        """Multi-hot ``(num_classes,)`` from a file returned by ``label_source`` (default: a mask)."""
        return self.multi_hot(self.classes_in_mask(load_png(path), path))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"
