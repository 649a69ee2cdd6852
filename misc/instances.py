"""Instance pseudo-labels from IRN displacement fields (spec 8.4) and COCO-format export.

Displacement fields are (2, h, w) with channel 0 = y (rows) and channel 1 = x (columns), in grid cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# 4-connectivity (no diagonals) for every connected-component labelling here.
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def find_centroids(displacement: np.ndarray, n_iter: int = 300) -> np.ndarray:
    """Refined centroid of every pixel: start at the pixel, repeat ``p <- clip(p + D(p))`` ``n_iter`` times.

    displacement: float (2, h, w). D is sampled bilinearly at the fractional position; positions are
    clipped to the grid after each step and rounded at the end. Returns int64 (h, w, 2) = (y, x).
    """
    d = np.asarray(displacement, dtype=np.float64)
    _, h, w = d.shape
    y, x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    y, x = y.ravel(), x.ravel()
    dy, dx = d[0], d[1]
    for _ in range(n_iter):
        y0 = np.floor(y).astype(np.int64)
        x0 = np.floor(x).astype(np.int64)
        # On the last row/column the upper neighbour is the pixel itself (its weight is 0 there anyway).
        y1 = np.minimum(y0 + 1, h - 1)
        x1 = np.minimum(x0 + 1, w - 1)
        fy, fx = y - y0, x - x0
        w00, w01 = (1 - fy) * (1 - fx), (1 - fy) * fx
        w10, w11 = fy * (1 - fx), fy * fx
        step_y = w00 * dy[y0, x0] + w01 * dy[y0, x1] + w10 * dy[y1, x0] + w11 * dy[y1, x1]
        step_x = w00 * dx[y0, x0] + w01 * dx[y0, x1] + w10 * dx[y1, x0] + w11 * dx[y1, x1]
        y = np.clip(y + step_y, 0, h - 1)
        x = np.clip(x + step_x, 0, w - 1)
    return np.stack([np.round(y), np.round(x)], axis=-1).astype(np.int64).reshape(h, w, 2)


def cluster_centroids(displacement: np.ndarray, centroids: np.ndarray, thresh: float = 2.5) -> np.ndarray:
    """Group pixels by the centroid region their refined centroid lands in.

    displacement: (2, h, w); centroids: int (h, w, 2) from ``find_centroids``. Centroid regions are the
    4-connected components of ``|D| < thresh``. Returns int64 (h, w) cluster ids relabelled consecutively
    from 0 in the order (landed outside every region, region 1, region 2, ...), so id 0 is the "outside"
    group when any pixel landed outside; the number of clusters is ``max + 1``.
    """
    d = np.asarray(displacement, dtype=np.float64)
    regions, _ = ndimage.label(np.hypot(d[0], d[1]) < thresh, structure=_FOUR_CONNECTED)
    landed = regions[centroids[..., 0], centroids[..., 1]]
    _, cluster = np.unique(landed, return_inverse=True)
    return cluster.reshape(landed.shape).astype(np.int64)


def to_one_hot(cluster_map: np.ndarray) -> np.ndarray:
    """int (h, w) ids 0..N-1 -> bool (N, h, w) with N = max + 1."""
    cluster_map = np.asarray(cluster_map)
    n = int(cluster_map.max()) + 1 if cluster_map.size else 0
    return np.arange(n)[:, None, None] == cluster_map[None]


def detections_from_maps(
    rw: np.ndarray, keys: np.ndarray, n_clusters: int, bg_thres: float = 0.25, min_area_frac: float = 0.01
) -> dict[str, np.ndarray]:
    """Instance detections from propagated instance maps (spec 8.4 steps 3-4).

    rw: float (k*N, H, W), already random-walked, upsampled to the image and divided by the global max;
    channel ``i*N + n`` is class ``keys[i]`` (0-based) restricted to cluster n. A background plane
    ``bg_thres`` is prepended and the argmax taken; every channel's pixels are split into 4-connected
    components, each one detection scored by the maximum of its channel's map inside it, except that
    components smaller than ``min_area_frac`` of the image get score 0. Returns
    ``{"score": float32 (M,), "mask": bool (M, H, W), "class": int64 (M,)}``.
    """
    rw = np.asarray(rw, dtype=np.float32)
    keys = np.asarray(keys, dtype=np.int64)
    n_maps, h, w = rw.shape
    if n_maps != keys.size * n_clusters:
        raise ValueError(f"{n_maps} maps do not match {keys.size} classes x {n_clusters} clusters")
    winner = np.argmax(np.concatenate([np.full((1, h, w), bg_thres, dtype=np.float32), rw]), axis=0) - 1
    min_area = min_area_frac * h * w
    scores, masks, classes = [], [], []
    for ch in np.unique(winner[winner >= 0]):
        components, n_comp = ndimage.label(winner == ch, structure=_FOUR_CONNECTED)
        for comp in range(1, n_comp + 1):
            mask = components == comp
            scores.append(float(rw[ch][mask].max()) if mask.sum() >= min_area else 0.0)
            masks.append(mask)
            classes.append(keys[ch // n_clusters])
    return {
        "score": np.asarray(scores, dtype=np.float32),
        "mask": np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool),
        "class": np.asarray(classes, dtype=np.int64),
    }


def _rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of the column-major (Fortran-order) pixels, alternating 0-runs and 1-runs, zeros first."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return [0]
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def _encode_counts(counts: Sequence[int]) -> str:
    """COCO's compressed-counts string: from the 4th count on, store the difference to the count two
    before; each signed value in little-endian 5-bit groups, 0x20 = "more groups follow", 0x10 of the last
    group = sign, each group offset by 48 into printable ASCII."""
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        while True:
            group = x & 0x1F
            x >>= 5  # arithmetic shift: negative values converge to -1
            more = x != -1 if group & 0x10 else x != 0
            if more:
                group |= 0x20
            chars.append(chr(48 + group))
            if not more:
                break
    return "".join(chars)


def _decode_counts(s: str) -> list[int]:
    counts: list[int] = []
    pos = 0
    while pos < len(s):
        x, shift = 0, 0
        while True:
            group = ord(s[pos]) - 48
            pos += 1
            x |= (group & 0x1F) << shift
            shift += 5
            if not group & 0x20:
                if group & 0x10:
                    x -= 1 << shift  # sign-extend
                break
        counts.append(x + counts[-2] if len(counts) > 2 else x)
    return counts


def mask_to_rle(mask: np.ndarray) -> dict:
    """bool (H, W) -> COCO compressed RLE ``{"size": [H, W], "counts": str}`` (same string as pycocotools)."""
    mask = np.asarray(mask, dtype=bool)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _encode_counts(_rle_counts(mask))}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Inverse of ``mask_to_rle``: COCO compressed RLE -> bool (H, W)."""
    h, w = rle["size"]
    counts = _decode_counts(rle["counts"])
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts cover {sum(counts)} pixels, expected {h * w}")
    values = np.arange(len(counts)) % 2 == 1  # runs alternate 0, 1, 0, ...
    return np.repeat(values, counts).reshape((h, w), order="F")


def mask_to_bbox(mask: np.ndarray) -> list[int]:
    """Tight COCO box ``[x, y, w, h]`` of a bool (H, W) mask; zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def coco_json(
    image_ids: Sequence[str],
    image_sizes: Sequence[tuple[int, int]],
    detections: Sequence[dict[str, np.ndarray]],
    class_names: Sequence[str],
) -> dict:
    """COCO-format dataset dict of instance detections (e.g. pseudo labels for training Mask R-CNN).

    image_ids: VOC ids (``file_name = <id>.jpg``); image_sizes: (H, W) each; detections: one dict per image
    as returned by ``detections_from_maps`` (0-based ``class``). Images get ids 1..n in list order,
    categories ids 1..C with ``class_names`` (0-based class c -> category_id c+1), annotations carry an RLE
    ``segmentation``, ``bbox`` [x, y, w, h], ``area`` (pixels), ``score``, ``iscrowd`` 0.
    """
    if not (len(image_ids) == len(image_sizes) == len(detections)):
        raise ValueError("image_ids, image_sizes and detections must have one entry per image")
    images, annotations = [], []
    for index, (name, (h, w), det) in enumerate(zip(image_ids, image_sizes, detections, strict=True), 1):
        images.append({"id": index, "file_name": f"{name}.jpg", "height": int(h), "width": int(w)})
        for mask, cls, score in zip(det["mask"], det["class"], det["score"], strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": int(cls) + 1,
                    "segmentation": mask_to_rle(mask),
                    "bbox": mask_to_bbox(mask),
                    "area": int(np.count_nonzero(mask)),
                    "score": float(score),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": c + 1, "name": name, "supercategory": "voc"} for c, name in enumerate(class_names)]
    return {"images": images, "categories": categories, "annotations": annotations}
