"""Dense CRF (``pydensecrf2``) on hard labels and on class probabilities; CAM -> IRN / AffinityNet seeds."""

from __future__ import annotations

import numpy as np

from misc.errors import UserError
from misc.labels import scores_to_label

# PSA's pairwise kernels (seam_affinitynet spec 2.4): Gaussian sxy 3, compat 3; bilateral sxy 80, srgb 13, compat 10.
PSA_CRF = {"gauss_xy": 3.0, "gauss_w": 3.0, "bi_xy": 80.0, "bi_rgb": 13.0, "bi_w": 10.0}


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


def _seed_inputs(high_res: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A CAM file's maps as float32 (k, H, W) and its classes as int64 (k,); ``ValueError`` if they disagree."""
    high_res = np.asarray(high_res, dtype=np.float32)
    keys = np.asarray(keys, dtype=np.int64)
    if keys.shape != high_res.shape[:1]:
        raise ValueError(f"keys {keys.shape} do not match {high_res.shape[0]} CAM planes")
    return high_res, keys


def ir_label_from_cam(
    img: np.ndarray, high_res: np.ndarray, keys: np.ndarray, fg_thres: float = 0.30, bg_thres: float = 0.05
) -> np.ndarray:
    """Confident foreground/background seeds for IRN training from full-resolution CAMs (spec 6).

    img: uint8 (H, W, 3); high_res: float (k, H, W) per-class max-normalised CAMs; keys: int (k,) 0-based
    classes. Two CRF passes, with a constant background plane of ``fg_thres`` and of ``bg_thres``. Returns
    uint8 (H, W): ``c+1`` where the high-threshold pass says class c, 0 where even the low-threshold pass
    says background, 255 (ignore) in between.
    """
    high_res, keys = _seed_inputs(high_res, keys)
    k, h, w = high_res.shape
    if k == 0:
        # No class in the image: everything is confidently background.
        return np.zeros((h, w), dtype=np.uint8)
    keys_plus = np.concatenate([[0], keys + 1])

    def one_pass(thres: float) -> np.ndarray:
        # The CRF works on compact labels 0..k (0 = background); keys_plus maps them back to VOC labels.
        compact = scores_to_label(high_res, np.arange(k), thres)
        return keys_plus[crf_inference_label(img, compact, n_labels=k + 1)]

    return fuse_seeds(one_pass(fg_thres), one_pass(bg_thres))


def fuse_seeds(fg_pass: np.ndarray, bg_pass: np.ndarray) -> np.ndarray:
    """Two label maps (H, W) of a confident-foreground pass (large background) and a confident-background
    pass (small background) -> uint8 seeds: the first pass's class where it names one, 0 where even the
    second says background, 255 (ignore) in between (IRNet spec 6; PSA spec 3.5)."""
    out = fg_pass.astype(np.uint8)
    out[fg_pass == 0] = 255
    out[(fg_pass == 0) & (bg_pass == 0)] = 0
    return out


def aff_label_from_cam(
    img: np.ndarray, high_res: np.ndarray, keys: np.ndarray, low_alpha: float = 4.0, high_alpha: float = 32.0
) -> np.ndarray:
    """PSA's seeds (seam_affinitynet spec 3.4-3.5): two CRFs on the class maps with a background
    ``(1 - max_c CAM)^alpha``, ``low_alpha`` for the foreground pass and ``high_alpha`` for the background
    pass, fused as :func:`fuse_seeds` does.

    img: uint8 (H, W, 3); high_res: float (k, H, W) per-class max-normalised CAMs; keys: int (k,) 0-based
    classes. PSA's CRF (``PSA_CRF``, 10 iterations) runs on the scores as given (not renormalised).
    Returns uint8 (H, W) in {0, c + 1, 255}. The reference fuses the two passes' probabilities after an
    8 x 8 block mean on the training grid; we fuse the labels at full resolution, which the training step
    then samples down (stored as one PNG, not two probability volumes).
    """
    high_res, keys = _seed_inputs(high_res, keys)
    high_res = np.clip(high_res, 0, 1)
    k, h, w = high_res.shape
    if k == 0:
        return np.zeros((h, w), dtype=np.uint8)
    keys_plus = np.concatenate([[0], keys + 1])
    top = high_res.max(axis=0, keepdims=True)

    def one_pass(alpha: float) -> np.ndarray:
        scores = np.concatenate([(1 - top) ** alpha, high_res])
        q = crf_inference_prob(img, scores, t=10, **PSA_CRF)
        return keys_plus[q.argmax(axis=0)]

    return fuse_seeds(one_pass(low_alpha), one_pass(high_alpha))
