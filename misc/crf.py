"""Dense CRF (``pydensecrf2``) on hard labels and on class probabilities; CAM -> IR labels (spec 6, 11.2)."""

from __future__ import annotations

import numpy as np

from misc.errors import UserError
from misc.labels import scores_to_label


def _densecrf():
    """Import pydensecrf lazily so that modules which never run a CRF do not need it installed."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_labels, unary_from_softmax
    except ImportError as e:
        raise UserError(f"the dense CRF needs pydensecrf ({e}): install it with `pip install pydensecrf2`.") from e
    return dcrf, unary_from_labels, unary_from_softmax


def _check_image(img: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.shape[:2] != tuple(shape):
        raise ValueError(f"expected a uint8 (H, W, 3) image of size {tuple(shape)}, got {img.dtype} {img.shape}")
    # The bilateral kernel takes a C-contiguous, writeable buffer of packed RGB (PIL's arrays are read-only).
    return np.require(img, requirements=["C", "W"])


def crf_inference_label(
    img: np.ndarray, labels: np.ndarray, n_labels: int, t: int = 10, gt_prob: float = 0.7
) -> np.ndarray:
    """Refine a hard label map with the IRNet dense CRF (spec 6).

    img: uint8 (H, W, 3) RGB; labels: int (H, W) in ``0..n_labels-1``. Unary: the given label has
    probability ``gt_prob``, each other label ``(1-gt_prob)/(n_labels-1)`` (label 0 is a real label).
    Pairwise: Gaussian (sxy 3, compat 3) + bilateral (sxy 50, srgb 5, compat 10); ``t`` mean-field
    iterations. Returns int64 (H, W), the argmax of Q.
    """
    labels = np.asarray(labels)
    h, w = labels.shape
    img = _check_image(img, (h, w))
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"labels must be in 0..{n_labels - 1}")
    if n_labels == 1:
        # One label has nothing to compete with (and the unary formula would divide by zero).
        return np.zeros((h, w), dtype=np.int64)
    dcrf, unary_from_labels, _ = _densecrf()
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=img, compat=10)
    q = np.asarray(crf.inference(t)).reshape(n_labels, h, w)
    return np.argmax(q, axis=0)


def crf_inference_prob(
    img: np.ndarray,
    probs: np.ndarray,
    t: int = 10,
    gauss_w: float = 3.0,
    gauss_xy: float = 1.0,
    bi_w: float = 4.0,
    bi_xy: float = 67.0,
    bi_rgb: float = 3.0,
) -> np.ndarray:
    """Dense CRF on class probabilities, DeepLab post-processing recipe (spec 11.2).

    img: uint8 (H, W, 3) RGB; probs: float (C, H, W), softmax output (each pixel sums to 1). Unary =
    -log(clip(probs, 1e-5)). Returns the refined marginals Q, float32 (C, H, W); argmax them for labels.
    """
    probs = np.asarray(probs, dtype=np.float32)
    c, h, w = probs.shape
    img = _check_image(img, (h, w))
    dcrf, _, unary_from_softmax = _densecrf()
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=gauss_xy, compat=gauss_w)
    crf.addPairwiseBilateral(sxy=bi_xy, srgb=bi_rgb, rgbim=img, compat=bi_w)
    return np.asarray(crf.inference(t), dtype=np.float32).reshape(c, h, w)


def ir_label_from_cam(
    img: np.ndarray, high_res: np.ndarray, keys: np.ndarray, fg_thres: float = 0.30, bg_thres: float = 0.05
) -> np.ndarray:
    """Confident foreground/background seeds for IRN training from full-resolution CAMs (spec 6).

    img: uint8 (H, W, 3); high_res: float (k, H, W) per-class max-normalised CAMs; keys: int (k,) 0-based
    classes. Two CRF passes, with a constant background plane of ``fg_thres`` and of ``bg_thres``. Returns
    uint8 (H, W): ``c+1`` where the high-threshold pass says class c, 0 where even the low-threshold pass
    says background, 255 (ignore) in between.
    """
    high_res = np.asarray(high_res, dtype=np.float32)
    k, h, w = high_res.shape
    keys = np.asarray(keys, dtype=np.int64)
    if keys.shape != (k,):
        raise ValueError(f"keys {keys.shape} do not match {k} CAM planes")
    if k == 0:
        # No class in the image: everything is confidently background.
        return np.zeros((h, w), dtype=np.uint8)
    keys_plus = np.concatenate([[0], keys + 1])

    def one_pass(thres: float) -> np.ndarray:
        # The CRF works on compact labels 0..k (0 = background); keys_plus maps them back to VOC labels.
        compact = scores_to_label(high_res, np.arange(k), thres)
        return keys_plus[crf_inference_label(img, compact, n_labels=k + 1)]

    fg = one_pass(fg_thres)
    bg = one_pass(bg_thres)
    out = fg.astype(np.uint8)
    out[fg == 0] = 255
    out[(fg == 0) & (bg == 0)] = 0
    return out
