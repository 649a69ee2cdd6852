"""Resampling, crops, flips and normalisation (spec 1.4-1.5).

Images are uint8 RGB ``(H, W, 3)`` until ``normalize``; label maps are uint8 ``(H, W)``. Every random
function takes an explicit ``np.random.Generator`` so that a dataset can derive one generator per
(seed, epoch, sample) and get the same augmentation whatever the number of loader workers or processes.
Joint functions apply one random draw to all arrays of a sample (image and its label map), so they stay
aligned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from net.backbone import IMAGENET_MEAN, IMAGENET_STD

_PIL_FILTERS = {0: Image.Resampling.NEAREST, 3: Image.Resampling.BICUBIC}


def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` -> float32 ``(H, W, 3)`` as ``(rgb / 255 - mean) / std``."""
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return (img.astype(np.float32) / 255.0 - mean) / std


def scaled_size(shape: Sequence[int], scale: float) -> tuple[int, int]:
    """``(round(H * s), round(W * s))`` with numpy's round-half-even, at least 1 pixel per side."""
    return max(1, int(np.round(shape[0] * scale))), max(1, int(np.round(shape[1] * scale)))


def resize(img: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """Resize a uint8 ``(H, W)`` or ``(H, W, 3)`` array to ``size = (h, w)`` with PIL.

    ``order`` 3 = bicubic (images), 0 = nearest (label maps). Returns the input itself if the size is
    unchanged.
    """
    if img.dtype != np.uint8:
        raise TypeError(f"resize expects uint8 arrays, got {img.dtype}")
    if tuple(img.shape[:2]) == tuple(size):
        return img
    out = Image.fromarray(img).resize((size[1], size[0]), resample=_PIL_FILTERS[order])
    return np.asarray(out)


def rescale(img: np.ndarray, scale: float, order: int) -> np.ndarray:
    """Scale a uint8 ``(H, W[, 3])`` array by ``scale`` (spec 1.5); a no-op when the size is unchanged."""
    return resize(img, scaled_size(img.shape, scale), order)


def random_resize_long(img: np.ndarray, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    """Bicubic rescale so that the long side becomes ``L ~ UniformInt[lo, hi]`` (both inclusive)."""
    long_side = int(rng.integers(lo, hi + 1))
    return rescale(img, long_side / max(img.shape[:2]), 3)


def random_scale(
    arrays: Sequence[np.ndarray],
    scale_range: tuple[float, float],
    rng: np.random.Generator,
    orders: Sequence[int] = (3, 0),
) -> list[np.ndarray]:
    """Rescale all arrays by one ``s = lo + U[0, 1) * (hi - lo)``; ``orders[i]`` is 3 (image) or 0 (label)."""
    lo, hi = scale_range
    s = lo + rng.random() * (hi - lo)
    return [rescale(a, s, order) for a, order in zip(arrays, orders, strict=True)]


def random_lr_flip(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """With probability 0.5 flip every array left-right (axis 1), jointly."""
    if rng.random() < 0.5:
        return [np.ascontiguousarray(a[:, ::-1]) for a in arrays]
    return list(arrays)


def _axis_box(extent: int, size: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(container offset, image offset, length) along one axis for ``random_crop`` (spec 1.5)."""
    if extent > size:
        return 0, int(rng.integers(0, extent - size + 1)), size
    # The whole extent fits: it goes into the container at a random offset, the rest stays at ``fill``.
    return int(rng.integers(0, size - extent + 1)), 0, extent


def random_crop(
    arrays: Sequence[np.ndarray],
    size: int,
    fills: Sequence[float],
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Crop all arrays (same ``(H, W)``) to ``(size, size)`` with one random box (spec 1.5).

    Per axis of extent ``d``: if ``d > size`` a window at ``UniformInt[0, d - size]`` is cut out of the
    image; otherwise the whole extent is copied into a ``size``-long container at offset
    ``UniformInt[0, size - d]``. The container of ``arrays[i]`` is pre-filled with ``fills[i]`` (0 for a
    normalised image, i.e. the mean colour; 255 = ignore for a label map). Rows are drawn before columns.
    """
    h, w = arrays[0].shape[:2]
    for a in arrays[1:]:
        if a.shape[:2] != (h, w):
            raise ValueError(f"random_crop needs arrays of one size, got {(h, w)} and {a.shape[:2]}")
    cy, iy, lh = _axis_box(h, size, rng)
    cx, ix, lw = _axis_box(w, size, rng)
    out = []
    for a, fill in zip(arrays, fills, strict=True):
        cont = np.full((size, size) + a.shape[2:], fill, dtype=a.dtype)
        cont[cy : cy + lh, cx : cx + lw] = a[iy : iy + lh, ix : ix + lw]
        out.append(cont)
    return out


def top_left_crop(img: np.ndarray, size: int, fill: float) -> np.ndarray:
    """``(size, size[, C])`` container filled with ``fill``; ``img[:size, :size]`` goes to its top-left."""
    cont = np.full((size, size) + img.shape[2:], fill, dtype=img.dtype)
    h, w = min(size, img.shape[0]), min(size, img.shape[1])
    cont[:h, :w] = img[:h, :w]
    return cont


def hwc_to_chw(img: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` -> contiguous ``(C, H, W)``."""
    return np.ascontiguousarray(img.transpose(2, 0, 1))
