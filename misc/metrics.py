"""Semantic-segmentation scores from a confusion matrix, and VOC instance-segmentation AP (spec 5, 8.4, 9).

Own numpy code in place of chainercv. The confusion matrix is a plain int64 array, so DDP ranks can sum
theirs with one ``all_reduce`` before scoring.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int = 255) -> np.ndarray:
    """Dataset-level confusion counts of one image: ``conf[g, p]`` = #pixels with GT ``g`` and prediction ``p``.

    gt, pred: int (H, W). GT pixels equal to ``ignore`` are skipped. Predicted values outside
    ``0..num_classes-1`` (e.g. 255) count as background 0 (spec 9). Returns int64 (C, C); sum it over images.
    """
    gt = np.asarray(gt).astype(np.int64).ravel()
    pred = np.asarray(pred).astype(np.int64).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred differ in size: {gt.size} vs {pred.size}")
    valid = gt != ignore
    gt, pred = gt[valid], pred[valid]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"GT values must be in 0..{num_classes - 1} or {ignore}")
    pred = np.where((pred < 0) | (pred >= num_classes), 0, pred)
    return np.bincount(gt * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray, present: np.ndarray) -> np.ndarray:
    """num/den for present classes, 0 where a present class has den = 0 (sklearn's zero_division=0), NaN
    for absent classes."""
    out = np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)
    out[~present] = np.nan
    return out


def _mean_pct(values: np.ndarray) -> float | None:
    """Percent nan-mean; None when every entry is NaN (JSON has no NaN)."""
    values = values[~np.isnan(values)]
    return float(100.0 * values.mean()) if values.size else None


def _pct(value: float) -> float | None:
    return None if np.isnan(value) else float(100.0 * value)


def segmentation_scores(conf: np.ndarray, class_names: Sequence[str]) -> dict:
    """IoU, precision, recall and FP/FN rates from a (C, C) confusion matrix (rows GT, columns prediction).

    A class is *present* when it occurs in the GT or the prediction (union > 0); absent classes get None
    and are left out of every mean, so a dataset that uses only some classes (the demo) is scored over
    those. For present classes, an undefined precision (never predicted) or recall (not in GT) counts as 0.
    Rates of spec 9: ``fp_c = (pred_c - TP_c) / union_c``, ``fn_c = (GT_c - TP_c) / union_c``; ``bg_*`` is
    class 0, ``fg_*_mean`` the mean over classes 1..C-1. All values are percentages, JSON-serialisable.
    """
    conf = np.asarray(conf, dtype=np.float64)
    if conf.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {conf.shape} does not match {len(class_names)} class names")
    tp = np.diag(conf)
    gt_count = conf.sum(axis=1)
    pred_count = conf.sum(axis=0)
    union = gt_count + pred_count - tp
    present = union > 0
    iou = _ratio(tp, union, present)
    precision = _ratio(tp, pred_count, present)
    recall = _ratio(tp, gt_count, present)
    fp = _ratio(pred_count - tp, union, present)
    fn = _ratio(gt_count - tp, union, present)
    total = conf.sum()
    return {
        "miou": _mean_pct(iou),
        "per_class": {name: _pct(v) for name, v in zip(class_names, iou, strict=True)},
        "precision": {name: _pct(v) for name, v in zip(class_names, precision, strict=True)},
        "recall": {name: _pct(v) for name, v in zip(class_names, recall, strict=True)},
        "mean_precision": _mean_pct(precision),
        "mean_recall": _mean_pct(recall),
        "bg_fp": _pct(fp[0]),
        "bg_fn": _pct(fn[0]),
        "fg_fp_mean": _mean_pct(fp[1:]),
        "fg_fn_mean": _mean_pct(fn[1:]),
        "pixel_acc": float(100.0 * tp.sum() / total) if total > 0 else None,
    }


def seed_confusion(gt: np.ndarray, seeds: np.ndarray, num_classes: int, ignore: int = 255) -> np.ndarray:
    """Confusion counts of sparse seeds against the GT: ``conf[g, p]`` for seed class ``p`` in
    ``0..num_classes-1`` and ``conf[g, num_classes]`` for GT pixels the seeds leave unlabelled (``ignore``).

    gt, seeds: int (H, W). GT pixels equal to ``ignore`` are skipped. Returns int64 (C, C + 1); sum it over images.
    """
    # Unlabelled is one more prediction column; a GT value there would be out of range.
    conf = confusion_matrix(gt, np.where(np.asarray(seeds) == ignore, num_classes, seeds), num_classes + 1, ignore)
    if conf[num_classes].any():
        raise ValueError(f"GT values must be in 0..{num_classes - 1} or {ignore}")
    return conf[:num_classes]


def seed_scores(conf: np.ndarray, class_names: Sequence[str]) -> dict:
    """Precision and recall of confident seeds from a :func:`seed_confusion` sum (class 0 is background).

    ``fg_precision``: of the pixels seeded with an object class, the share whose GT is that class;
    ``fg_recall``: of the GT object pixels, the share seeded with their class; ``bg_*`` the same for class 0
    (pixel counts pooled over classes); ``labelled``: the share of valid pixels that carry a seed. Per class
    precision / recall as in :func:`segmentation_scores` (recall against every GT pixel, seeded or not).
    All values are percentages (None where undefined).
    """
    conf = np.asarray(conf, dtype=np.float64)
    n = len(class_names)
    if conf.shape != (n, n + 1):
        raise ValueError(f"seed confusion {conf.shape} does not match {n} class names (expected ({n}, {n + 1}))")
    tp = np.diag(conf[:, :n])
    seeded = conf[:, :n].sum(axis=0)
    gt_count = conf.sum(axis=1)
    present = (gt_count + seeded) > 0

    def pooled(num: float, den: float) -> float | None:
        return float(100.0 * num / den) if den > 0 else None

    precision = _ratio(tp, seeded, present)
    recall = _ratio(tp, gt_count, present)
    return {
        "fg_precision": pooled(tp[1:].sum(), seeded[1:].sum()),
        "fg_recall": pooled(tp[1:].sum(), gt_count[1:].sum()),
        "bg_precision": pooled(tp[0], seeded[0]),
        "bg_recall": pooled(tp[0], gt_count[0]),
        "labelled": pooled(seeded.sum(), conf.sum()),
        "precision": {name: _pct(v) for name, v in zip(class_names, precision, strict=True)},
        "recall": {name: _pct(v) for name, v in zip(class_names, recall, strict=True)},
        "mean_precision": _mean_pct(precision),
        "mean_recall": _mean_pct(recall),
    }


def seed_details(row: dict) -> str:
    """The numbers of a ``seed_scores`` row beside its headline (fg precision), for summaries."""
    return ", ".join(f"{name} {row[key]:.1f}" for name, key in (
        ("fg recall", "fg_recall"), ("bg precision", "bg_precision"), ("bg recall", "bg_recall"),
        ("% seeded", "labelled")) if row[key] is not None)


def headline(row: dict) -> tuple[str, float]:
    """The one number a metrics row is known by: (metric name, value)."""
    if "map" in row:
        return "mAP@0.5", row["map"]
    if "fg_precision" in row:
        return "fg seed precision", row["fg_precision"] or 0.0
    return "mIoU", row["miou"]


def instances_from_voc(seg_object: np.ndarray, seg_class: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GT instances of one VOC image from its ``SegmentationObject`` and ``SegmentationClass`` PNGs.

    seg_object, seg_class: uint8 (H, W) (0 background, 255 void). Returns masks bool (N, H, W) for the
    instance ids k in 1..254 (ascending) and labels int64 (N,) = 0-based class (class value - 1). The void
    mask of the image is simply ``seg_object == 255``.
    """
    seg_object = np.asarray(seg_object)
    seg_class = np.asarray(seg_class)
    ids = [k for k in np.unique(seg_object) if k not in (0, 255)]
    masks = np.stack([seg_object == k for k in ids]) if ids else np.zeros((0, *seg_object.shape), bool)
    labels = []
    for mask in masks:
        values = seg_class[mask]
        values = values[(values != 0) & (values != 255)]
        if values.size == 0:
            raise ValueError("an instance of SegmentationObject has no class in SegmentationClass")
        # VOC instances carry exactly one class; the majority guards against a stray resampled pixel.
        labels.append(int(np.bincount(values).argmax()) - 1)
    return masks, np.asarray(labels, dtype=np.int64)


def mask_iou(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> np.ndarray:
    """IoU of every predicted mask with every GT mask: pred (M, H, W), gt (N, H, W) bool -> (M, N) float.

    Pixels that are void in the GT (bool (H, W)) are left out of the union (the GT masks never contain
    them), so a prediction is not penalised for covering VOC's unlabelled object borders.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if void is not None:
        pred = pred & ~np.asarray(void, dtype=bool)
    p = pred.reshape(len(pred), -1).astype(np.float64)
    g = gt.reshape(len(gt), -1).astype(np.float64)
    inter = p @ g.T
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the PR curve with the monotone precision envelope (VOC 2010+, not 11-point)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def instance_ap(
    pred_masks: Sequence[np.ndarray],
    pred_labels: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_masks: Sequence[np.ndarray],
    gt_labels: Sequence[np.ndarray],
    num_classes: int,
    iou_thresh: float = 0.5,
    gt_void: Sequence[np.ndarray | None] | None = None,
) -> tuple[np.ndarray, float]:
    """VOC instance-segmentation AP per class and its mean (chainercv's protocol).

    Per image i: pred_masks[i] bool (M_i, H, W), pred_labels[i] int (M_i,) 0-based, pred_scores[i] (M_i,),
    gt_masks[i] bool (N_i, H, W), gt_labels[i] int (N_i,), optionally gt_void[i] bool (H, W) (see
    ``mask_iou``). Per class, detections of all images are taken in descending score order; each is a true
    positive when its best-IoU GT of that class (IoU >= ``iou_thresh``) is not yet matched, else a false
    positive. Returns (ap (num_classes,) with NaN for classes absent from the GT, nanmean of ap) — AP in
    [0, 1]; a class with GT but no detection scores 0.
    """
    n_images = len(gt_masks)
    if not (len(pred_masks) == len(pred_labels) == len(pred_scores) == len(gt_labels) == n_images):
        raise ValueError("prediction and GT lists must have one entry per image")
    n_pos = np.zeros(num_classes, dtype=np.int64)
    scores: list[list[float]] = [[] for _ in range(num_classes)]
    hits: list[list[bool]] = [[] for _ in range(num_classes)]
    for i in range(n_images):
        p_lab = np.asarray(pred_labels[i], dtype=np.int64)
        p_score = np.asarray(pred_scores[i], dtype=np.float64)
        g_lab = np.asarray(gt_labels[i], dtype=np.int64)
        void = None if gt_void is None else gt_void[i]
        n_pos += np.bincount(g_lab, minlength=num_classes)[:num_classes]
        for c in np.unique(p_lab):
            p_sel = np.flatnonzero(p_lab == c)
            p_sel = p_sel[np.argsort(-p_score[p_sel], kind="stable")]
            g_sel = np.flatnonzero(g_lab == c)
            scores[c].extend(p_score[p_sel].tolist())
            if g_sel.size == 0:
                hits[c].extend([False] * p_sel.size)
                continue
            iou = mask_iou(np.asarray(pred_masks[i])[p_sel], np.asarray(gt_masks[i])[g_sel], void)
            matched = np.zeros(g_sel.size, dtype=bool)
            # Greedy in descending score within the image: the global order across images does not change
            # which detection claims a GT, because matching only competes within one image.
            for row in iou:
                best = int(row.argmax())
                hit = row[best] >= iou_thresh and not matched[best]
                if hit:
                    matched[best] = True
                hits[c].append(bool(hit))
    ap = np.full(num_classes, np.nan)
    for c in range(num_classes):
        if n_pos[c] == 0:
            continue
        order = np.argsort(-np.asarray(scores[c]), kind="stable")
        tp = np.cumsum(np.asarray(hits[c], dtype=np.float64)[order])
        fp = np.cumsum(1.0 - np.asarray(hits[c], dtype=np.float64)[order])
        ap[c] = voc_ap(tp / n_pos[c], tp / np.maximum(tp + fp, np.finfo(np.float64).eps))
    valid = ap[~np.isnan(ap)]
    return ap, float(valid.mean()) if valid.size else float("nan")


def choose_threshold(thresholds: Sequence[float], precision: Sequence[float | None],
                     recall: Sequence[float | None]) -> float | None:
    """The precision-aware background threshold (orandnet spec 9): the first (lowest) of ascending
    ``thresholds`` whose mean precision exceeds its mean recall, or None if none does.

    Raising the background threshold trades recall for precision, so this is where the CAM's masks turn
    from over- to under-covering; ``precision[i]`` / ``recall[i]`` are the means at ``thresholds[i]``.
    """
    for t, p, r in sorted(zip(thresholds, precision, recall, strict=True)):
        if p is not None and r is not None and p > r:
            return float(t)
    return None
