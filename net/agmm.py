"""AGMM's losses (Wu et al., CVPR 2023, "Sparsely Annotated Semantic Segmentation with Adaptive Gaussian
Mixtures"; /work/shared/spec/agmm.md sections 5-6) on DeepLab-v3+'s decoder features and logits.

Notation (spec 5): ``K`` classes (the mask values a segmenter predicts, background included), a sparse mask
``m`` ``(B, H, W)`` with ``0..K-1`` labelled, ``K`` unlabelled and ``SPARSE_PADDING`` (255) outside the image
(``misc.labels``); ``F`` the decoder features ``(B, C, h, w)`` at stride 4, ``Y`` the logits ``(B, K, H, W)``,
``P = softmax(Y)``; ``y`` the image-level classes ``(B, K)`` of the whole (uncropped) sparse mask and
``y_cur`` those with a labelled pixel inside the crop. Every loss is a mean over a pixel set that may be
empty with sparse labels and small batches; an empty set gives 0, not NaN (the spec's bug B2, fixed).

Total (all weights 1, as released): ``L = L_pce + L_neg + L_proto + L_gmm,u + L_gmm,l``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from misc.labels import SPARSE_PADDING

EPS = 1e-6  # the reference's guard inside every log and ratio


def _mean_over(values: Tensor, where: Tensor) -> Tensor:
    """Mean of ``values`` ``(B, H, W)`` over the pixels where ``where`` is true; 0 for an empty set (B2)."""
    where = where.to(values.dtype)
    return (values * where).sum() / where.sum().clamp(min=1)


def present_classes(mask: Tensor, num_labels: int) -> Tensor:
    """``(B, H, W)`` sparse mask -> ``(B, K)`` float: 1 where class ``k`` has a labelled pixel in the mask.

    On the cropped mask this is ``y_cur``; on the whole file's mask ``y`` (``cls_label``). The unlabelled
    value ``K`` and the padding 255 both land in an extra column that is dropped.
    """
    flat = mask.flatten(1).clamp(max=num_labels)  # 255 -> K: both "no label"
    y = torch.zeros(mask.shape[0], num_labels + 1, device=mask.device)
    y.scatter_(1, flat, 1.0)
    return y[:, :num_labels]


def label_one_hot(mask: Tensor, num_labels: int) -> Tensor:
    """``(B, H, W)`` sparse mask -> ``(B, K, H, W)`` float one-hot of the labelled pixels (0 elsewhere)."""
    classes = torch.arange(num_labels, device=mask.device)
    return (mask[:, None] == classes[None, :, None, None]).float()


def partial_ce(logits: Tensor, mask: Tensor) -> Tensor:
    """``L_pce`` (spec 6.1): cross-entropy of ``(B, K, H, W)`` logits over the labelled pixels only; both the
    unlabelled value ``K`` and the padding are ignored."""
    num_labels = logits.shape[1]
    target = mask.masked_fill(mask >= num_labels, SPARSE_PADDING)  # K -> 255, as the reference does
    labelled = (target != SPARSE_PADDING).sum().clamp(min=1)
    return F.cross_entropy(logits.float(), target, ignore_index=SPARSE_PADDING, reduction="sum") / labelled


def absent_class_loss(probs: Tensor, cls_label: Tensor, mask: Tensor) -> Tensor:
    """``L_neg`` (spec 6.2): at every image pixel, ``sum over classes absent from the image of
    -log(1 - P_k + eps)``, averaged over the image pixels (``m != 255``) of the batch.

    ``probs`` ``(B, K, H, W)``; ``cls_label`` ``(B, K)``: the classes of the *uncropped* mask (bug B8: kept,
    a class outside the crop is still present in the image).
    """
    absent = (1.0 - cls_label)[:, :, None, None]
    per_pixel = -(torch.log(1.0 - probs + EPS) * absent).sum(1)
    return _mean_over(per_pixel, mask != SPARSE_PADDING)


def class_prototypes(feat: Tensor, mask: Tensor, num_labels: int) -> Tensor:
    """Per-image class centroids ``mu`` (spec 6.3) ``(B, K, C)`` of features ``(B, C, h, w)``: the mean of
    the features bilinearly upsampled to the mask's ``(H, W)`` over each class's labelled pixels, 0 for a
    class without any. Not detached: the GMM losses shape the features through them too."""
    up = F.interpolate(feat, size=mask.shape[1:], mode="bilinear", align_corners=False)
    one_hot = label_one_hot(mask, num_labels)
    sums = torch.einsum("bchw,bkhw->bkc", up, one_hot)
    counts = one_hot.sum((2, 3)).clamp(min=1)
    return sums / counts[:, :, None]


def prototype_loss(mu: Tensor, y_cur: Tensor, mean_fix: bool = False) -> Tensor:
    """``L_proto`` (spec 6.3): ``exp(-(mean_c |v_i - v_j|)^2)`` averaged over the pairs of classes present in
    the batch, 0 with fewer than two; it pushes class centroids apart.

    ``mu`` ``(B, K, C)``, ``y_cur`` ``(B, K)``. The batch centroid ``v_k`` is, as released, the *sum* of the
    per-image centroids times ``n_k / (n_k + eps)`` (bug B1, kept by default so the schedule's balance is the
    published one); ``mean_fix`` divides by ``n_k`` instead.
    """
    n = y_cur.sum(0)  # (K,) images with the class in their crop
    total = mu.sum(0)  # (K, C): an image without the class adds its zero centroid
    v = total / n.clamp(min=1)[:, None] if mean_fix else total * (n / (n + EPS))[:, None]
    present = torch.nonzero(n > 0).flatten()
    if present.numel() < 2:
        return mu.sum() * 0.0  # a zero that keeps the graph (DDP wants every parameter used)
    v = v[present]
    dist = (v[:, None] - v[None]).abs().mean(-1)  # (P, P)
    i, j = torch.triu_indices(len(present), len(present), 1, device=mu.device)
    return torch.exp(-dist[i, j] ** 2).mean()


def gmm_responses(feat: Tensor, mu: Tensor, y_cur: Tensor, mask: Tensor, probs: Tensor | None = None,
                  cls_label: Tensor | None = None, adaptive_sigma: bool = False) -> Tensor:
    """The Gaussian responses ``G`` ``(B, K, H, W)`` (spec 6.4) of features ``(B, C, h, w)`` to the per-image
    centroids ``mu`` ``(B, K, C)``.

    ``d_k(x)`` is the mean absolute difference over channels between ``F(x)`` and ``mu_k`` (a scaled L1, not
    Euclidean), zeroed for classes not in ``y_cur`` and scaled by the bilinearly downsampled image mask
    ``rho``; ``G = exp(-d^2)`` (the released fixed width, ``2 sigma^2 = 1``), bilinearly upsampled to
    ``(H, W)`` and zeroed for classes not in the crop. ``adaptive_sigma`` (the paper's wording; bug B3):
    ``sigma_k^2 = sum P~ d^2 / sum P~`` with ``P~ = softmax x y`` downsampled and times ``rho``, detached,
    and ``G = exp(-d^2 / (2 sigma^2 + eps))``; it needs ``probs`` ``(B, K, H, W)`` and ``cls_label`` ``(B, K)``.
    ``G`` keeps its gradients to the features and the centroids.
    """
    b, c, h, w = feat.shape
    # cdist with p=1 is the exact sum of absolute differences, without the (B, K, C, h, w) broadcast.
    d = torch.cdist(feat.flatten(2).transpose(1, 2), mu, p=1) / c  # (B, h*w, K)
    d = d.transpose(1, 2).reshape(b, -1, h, w)
    rho = F.interpolate((mask != SPARSE_PADDING).float()[:, None], size=(h, w), mode="bilinear",
                        align_corners=False)
    d = d * y_cur[:, :, None, None] * rho
    if adaptive_sigma:
        if probs is None or cls_label is None:
            raise ValueError("adaptive_sigma needs the prediction and the image-level classes")
        clean = F.interpolate(probs * cls_label[:, :, None, None], size=(h, w), mode="bilinear",
                              align_corners=False) * rho
        # Detached: the width follows the prediction but is no path for gradients (spec 6.4).
        sigma2 = ((clean * d**2).sum((2, 3)) / clean.sum((2, 3)).clamp(min=EPS)).detach()
        g = torch.exp(-(d**2) / (2 * sigma2[:, :, None, None] + EPS))
    else:
        g = torch.exp(-(d**2))
    g = F.interpolate(g, size=mask.shape[1:], mode="bilinear", align_corners=False)
    return g * y_cur[:, :, None, None]


def _class_mean(per_class: Tensor, y_cur: Tensor) -> Tensor:
    """``(B, K, H, W)`` -> ``(B, H, W)``: the mean over the classes present in the crop."""
    weights = y_cur[:, :, None, None]
    return (per_class * weights).sum(1) / (y_cur.sum(1)[:, None, None] + EPS)


def gmm_unlabelled_loss(probs: Tensor, g: Tensor, y_cur: Tensor, mask: Tensor) -> Tensor:
    """``L_gmm,u`` (spec 6.5): binary cross-entropy between the prediction ``P`` and the responses ``G``
    (both ``(B, K, H, W)``), halved, averaged over the present classes and then over every image pixel,
    labelled or not. ``G`` is not detached: the prediction shapes the mixtures as they shape it."""
    bce = -(g * torch.log(probs + EPS) + (1.0 - g) * torch.log(1.0 - probs + EPS)) / 2
    return _mean_over(_class_mean(bce, y_cur), mask != SPARSE_PADDING)


def gmm_labelled_loss(g: Tensor, mask: Tensor, y_cur: Tensor) -> Tensor:
    """``L_gmm,l`` (spec 6.6): at labelled pixels, the response of the true class is pushed to 1 and those of
    the other present classes to 0 (binary cross-entropy against the one-hot label, halved, averaged over
    the present classes and the labelled pixels). ``g`` ``(B, K, H, W)``, ``mask`` ``(B, H, W)``."""
    num_labels = g.shape[1]
    target = label_one_hot(mask, num_labels)
    bce = -(target * torch.log(g + EPS) + (1.0 - target) * torch.log(1.0 - g + EPS)) / 2
    return _mean_over(_class_mean(bce, y_cur), mask < num_labels)


def agmm_losses(feat: Tensor, logits: Tensor, mask: Tensor, cls_label: Tensor, *, neg_loss: bool = True,
                adaptive_sigma: bool = False, proto_mean_fix: bool = False) -> dict[str, Tensor]:
    """The five terms of spec 6 by name (``pce``, ``neg``, ``proto``, ``gmm_u``, ``gmm_l``), in float32.

    ``feat`` ``(B, C, h, w)`` decoder features, ``logits`` ``(B, K, H, W)`` at the mask's size, ``mask``
    ``(B, H, W)`` int64 sparse labels of the crop, ``cls_label`` ``(B, K)`` classes of the uncropped file.
    ``neg_loss=False`` drops ``L_neg`` (the flag the spec asks for; released code: on).
    """
    feat, logits = feat.float(), logits.float()
    num_labels = logits.shape[1]
    probs = logits.softmax(1)
    y_cur = present_classes(mask, num_labels)
    mu = class_prototypes(feat, mask, num_labels)
    g = gmm_responses(feat, mu, y_cur, mask, probs, cls_label, adaptive_sigma)
    return {
        "pce": partial_ce(logits, mask),
        "neg": absent_class_loss(probs, cls_label, mask) if neg_loss else probs.sum() * 0.0,
        "proto": prototype_loss(mu, y_cur, proto_mean_fix),
        "gmm_u": gmm_unlabelled_loss(probs, g, y_cur, mask),
        "gmm_l": gmm_labelled_loss(g, mask, y_cur),
    }
