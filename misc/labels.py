"""Score maps of an image's classes -> a label map with a constant background plane (spec 5, 6, 8.3)."""

from __future__ import annotations

import numpy as np

# Void / unlabelled pixels in every mask the pipeline reads or writes (VOC's convention).
IGNORE = 255

# Sparse labels (points, scribbles; AGMM spec 2.2) tell "no label here" apart from "no pixel here": values
# 0..K-1 are labelled pixels of the K = num_labels mask values, K itself is an unlabelled image pixel, and
# SPARSE_PADDING (the void value) only ever marks pixels outside the image, which a random crop pads with.
# The losses treat the two differently (the GMM terms supervise every image pixel, labelled or not), so a
# file that writes 255 for "unlabelled" would silently train on labelled pixels only.
SPARSE_PADDING = IGNORE


def unlabelled_value(num_labels: int) -> int:
    """The value of an unlabelled image pixel in a sparse label map of ``num_labels`` classes: ``K``."""
    return num_labels


def scores_to_label(scores: np.ndarray, keys: np.ndarray, bg_threshold: float) -> np.ndarray:
    """(k, H, W) scores of the 0-based classes ``keys`` -> uint8 (H, W) labels.

    A pixel is background (0) unless some class's score beats ``bg_threshold``; otherwise it takes the
    best class ``c`` as ``c + 1``.
    """
    scores = np.asarray(scores, dtype=np.float32)
    planes = np.concatenate([np.full((1, *scores.shape[1:]), bg_threshold, np.float32), scores])
    lookup = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1]).astype(np.uint8)
    return lookup[planes.argmax(0)]


def ignore_uncertain_background(
    label: np.ndarray, scores: np.ndarray, confident_bg_threshold: float, ignore: int = IGNORE
) -> np.ndarray:
    """``label`` (H, W) with every background pixel whose best class score (``scores``: (k, H, W)) is at
    least ``confident_bg_threshold`` set to ``ignore``.

    Such pixels are background only because no class beat the (higher) background threshold: an object's
    weakly activated parts are among them, and a network trained to call them background learns to
    shrink every object. Only confident background, below the threshold that marks IRN's background
    seeds, stays a label.
    """
    out = label.copy()
    if len(scores):
        out[(label == 0) & (np.asarray(scores).max(0) >= confident_bg_threshold)] = ignore
    return out
