"""Score maps of an image's classes -> a label map with a constant background plane (spec 5, 6, 8.3)."""

from __future__ import annotations

import numpy as np


def scores_to_label(scores: np.ndarray, keys: np.ndarray, bg_threshold: float) -> np.ndarray:
    """(k, H, W) scores of the 0-based classes ``keys`` -> uint8 (H, W) labels.

    A pixel is background (0) unless some class's score beats ``bg_threshold``; otherwise it takes the
    best class ``c`` as ``c + 1``.
    """
    scores = np.asarray(scores, dtype=np.float32)
    planes = np.concatenate([np.full((1, *scores.shape[1:]), bg_threshold, np.float32), scores])
    lookup = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1]).astype(np.uint8)
    return lookup[planes.argmax(0)]
