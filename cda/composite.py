"""CDA composite samples (spec 10.3): paste a bank object of an absent class into a training image.

Reference behaviour (``data_aug_rotation``) is the default except for the fixes listed here, each behind a
flag whose reference value reproduces the original:

- ``mask_order=0``: the object mask is rotated nearest-neighbour. The reference rotates it with cubic
  splines (``mask_order=3``), which dilates it by about a pixel (spec 10.6 bug 8).
- ``mask_resize="half"``: the mask is bilinearly resized as {0, 255} and kept where >= 128. The reference
  resizes the raw {0, c+1} values and keeps != 0 (``mask_resize="nonzero"``): after PIL's antialiased
  downsampling any pixel with weight >= 0.5/(c+1) survives, so the dilation grows with the class index.
- All randomness comes from the ``rng`` argument (bug 7: the reference draws from numpy's global RNG,
  which every loader worker replays).
- Labels are float32 (bug 6).

``class_weights="uniform"`` picks the pasted class uniformly (reference); ``"bank"`` weights classes by
their number of bank objects so each object is equally likely, which stops the few objects of rare classes
(diningtable: 16 vs person: 743 in the authors' bank, bug 9) from being reused far more often.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from cda.bank import load_object
from dataset.samples import ClassificationDataset

# A bank entry is a path to a ``.npz`` written by ``cda.bank`` or an in-memory ``(img, seg)`` pair.
BankEntry = str | os.PathLike | tuple[np.ndarray, np.ndarray]
Bank = Mapping[int, Sequence[BankEntry]]


def _to_uint8(a: np.ndarray) -> np.ndarray:
    # Interpolation runs in float and is rounded/clipped here: cubic splines overshoot the uint8 range.
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def rotate_object(
    img: np.ndarray, seg: np.ndarray, angle: float, *, image_order: int = 3, mask_order: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate an object crop about its centre, enlarging the canvas so nothing is cut.

    Args:
        img: uint8 (h, w, 3) RGB crop. seg: uint8 (h, w) mask values (0 = not the object).
        angle: degrees, counter-clockwise. image_order / mask_order: spline orders (0 nearest, 1 bilinear,
            3 cubic) for the RGB crop and the mask.

    Returns:
        ``(img uint8 (h', w', 3), seg uint8 (h', w'))``; the area outside the rotated crop is 0.
    """
    rot_img = ndimage.rotate(img.astype(np.float32), angle, reshape=True, order=image_order, cval=0.0)
    rot_seg = ndimage.rotate(seg.astype(np.float32), angle, reshape=True, order=mask_order, cval=0.0)
    return _to_uint8(rot_img), _to_uint8(rot_seg)


def cap_size(h: int, w: int, height: int, width: int, max_size: float = 0.7) -> tuple[int, int]:
    """Shrink ``(h, w)`` to at most ``max_size`` of the image on each side, keeping the aspect ratio.

    Spec 10.3 step 3, including its truncation to int; objects below the cap are not enlarged.
    """
    ar = w / h
    hf, wf = float(h), float(w)
    if hf > max_size * height:
        hf = max_size * height
        wf = hf * ar
    if wf > max_size * width:
        wf = max_size * width
        hf = wf / ar
    # A thin object can truncate to 0; one pixel keeps the resize well defined.
    return max(1, int(hf)), max(1, int(wf))


def _resize_mask(seg: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Bilinear (PIL) resize of a uint8 mask to ``size`` = (h, w); returns bool (h, w)."""
    if mode == "nonzero":
        resized = np.asarray(Image.fromarray(seg).resize(size[::-1], Image.BILINEAR))
        return resized != 0
    if mode == "half":
        binary = np.where(seg != 0, 255, 0).astype(np.uint8)
        resized = np.asarray(Image.fromarray(binary).resize(size[::-1], Image.BILINEAR))
        return resized >= 128
    raise ValueError(f"mask_resize must be 'half' or 'nonzero', got {mode!r}")


def _pick_class(label: np.ndarray, bank: Bank, rng: np.random.Generator, class_weights: str) -> int | None:
    candidates = [c for c in range(len(label)) if label[c] == 0 and len(bank.get(c, ())) > 0]
    if not candidates:
        return None
    if class_weights == "uniform":
        return candidates[int(rng.integers(len(candidates)))]
    if class_weights == "bank":
        sizes = np.array([len(bank[c]) for c in candidates], dtype=np.float64)
        return candidates[int(rng.choice(len(candidates), p=sizes / sizes.sum()))]
    raise ValueError(f"class_weights must be 'uniform' or 'bank', got {class_weights!r}")


def make_composite(
    img: np.ndarray,
    label: np.ndarray,
    bank: Bank,
    rng: np.random.Generator,
    *,
    max_size: float = 0.7,
    max_angle: int = 90,
    rescale: tuple[float, float] | None = None,
    image_order: int = 3,
    mask_order: int = 0,
    mask_resize: Literal["half", "nonzero"] = "half",
    class_weights: Literal["uniform", "bank"] = "uniform",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paste one bank object of a class absent from ``label`` into ``img`` (spec 10.3 steps 1-6).

    Args:
        img: uint8 (H, W, 3) RGB. label: (C,) multi-hot.
        bank: ``{c: [entries]}``, e.g. ``cda.bank.load_bank_index(...)``.
        rng: the only source of randomness (class, object, angle, scale, position).
        max_size: cap on the object's height/width as a fraction of H/W.
        max_angle: rotation angle ~ UniformInt[-max_angle, max_angle] degrees.
        rescale: ``(lo, hi)`` multiplies the capped size by U[lo, hi) (the reference's unused ``data_aug``
            variant); the result is clipped to the image. ``None`` (reference) disables it.
        image_order: spline order for rotating the RGB crop (3 cubic as the reference, 1 bilinear).
        mask_order, mask_resize, class_weights: see the module docstring.

    Returns:
        ``(composite uint8 (H, W, 3), label' float32 (C,) = label ∪ {c}, paste_mask bool (H, W))``.
        When no absent class has bank objects (possible with a bank built on a few classes, e.g. the
        demo), the image and label come back unchanged (copies) with an all-False mask.
    """
    height, width = img.shape[:2]
    out_label = np.asarray(label, dtype=np.float32).copy()
    paste = np.zeros((height, width), dtype=bool)
    c = _pick_class(out_label, bank, rng, class_weights)
    if c is None:
        return img.copy(), out_label, paste

    entry = bank[c][int(rng.integers(len(bank[c])))]
    obj_img, obj_seg = entry if isinstance(entry, tuple) else load_object(entry)
    angle = int(rng.integers(-max_angle, max_angle + 1))
    obj_img, obj_seg = rotate_object(obj_img, obj_seg, angle, image_order=image_order, mask_order=mask_order)

    h, w = cap_size(*obj_seg.shape, height, width, max_size)
    if rescale is not None:
        s = rng.uniform(*rescale)
        h, w = min(height, max(1, int(h * s))), min(width, max(1, int(w * s)))
    if (h, w) != obj_seg.shape:
        obj_img = np.asarray(Image.fromarray(obj_img).resize((w, h), Image.BILINEAR))
    mask = _resize_mask(obj_seg, (h, w), mask_resize)

    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    composite = img.copy()
    region = composite[top : top + h, left : left + w]
    region[mask] = obj_img[mask]  # hard paste, no blending (reference)
    paste[top : top + h, left : left + w] = mask
    out_label[c] = 1.0
    return composite, out_label, paste


class CompositeDataset(torch.utils.data.Dataset):
    """Pairs every training image with a composite of it (spec 10.3 step 7, 10.4).

    Item: ``{'name': str, 'img': float32 (3, S, S), 'label': float32 (C,), 'img_aug': float32 (3, S, S),
    'label_aug': float32 (C,)}``. The original and the composite go through ``base.transform``
    independently (separate resize/flip/crop draws). Generators, per sample and epoch:
    ``default_rng([seed, epoch, index])`` for the original's transform (the same draw as ``base`` with this
    seed), ``[..., index, 1]`` for the paste and ``[..., index, 2]`` for the composite's transform, so a
    sample is the same for any number of loader workers or processes. Call ``set_epoch`` every epoch.

    Args:
        base: the classification dataset (ids, labels, image reading and transform).
        bank: ``{c: [entries]}`` (``cda.bank.load_bank_index``). Other keywords: see ``make_composite``.
    """

    def __init__(
        self,
        base: ClassificationDataset,
        bank: Bank,
        *,
        seed: int = 0,
        **composite_options: Any,
    ) -> None:
        # make_composite owns the options and their defaults; a wrong keyword fails here, not in a worker.
        inspect.signature(make_composite).bind_partial(**composite_options)
        self.base = base
        self.bank = bank
        self.seed = seed
        self.epoch = 0
        self.composite_options = composite_options

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, *key: int) -> np.random.Generator:
        # Streams 1 and 2, never 0: SeedSequence treats [.., index, 0] like [.., index].
        return np.random.default_rng([self.seed, self.epoch, *key])

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.base.ids[index]
        img = self.base.info.read_photo(name)
        label = np.asarray(self.base.labels[name], dtype=np.float32)
        comp, comp_label, _ = make_composite(img, label, self.bank, self._rng(index, 1), **self.composite_options)
        return {
            "name": name,
            "img": torch.from_numpy(self.base.transform(img, self._rng(index))),
            "label": torch.from_numpy(label),
            "img_aug": torch.from_numpy(self.base.transform(comp, self._rng(index, 2))),
            "label_aug": torch.from_numpy(comp_label),
        }
