import numpy as np
import pytest

from misc.instances import (
    cluster_centroids,
    coco_json,
    detections_from_maps,
    find_centroids,
    mask_to_bbox,
    mask_to_rle,
    rle_to_mask,
    to_one_hot,
)


def _two_centre_field(h=12, w=30, a=(6, 7), b=(6, 22), gain=0.5):
    """Every pixel left of column 15 points (gain x offset) at centre a, the others at centre b."""
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    left = xx < 15
    cy = np.where(left, a[0], b[0])
    cx = np.where(left, a[1], b[1])
    return gain * np.stack([cy - yy, cx - xx]), left


def test_two_centres_give_two_clusters():
    # gain 0.5 leaves fractional positions after the first step, which exercises the bilinear sampling
    disp, left = _two_centre_field()
    cent = find_centroids(disp, n_iter=300)
    assert cent.shape == (12, 30, 2) and cent.dtype == np.int64
    np.testing.assert_array_equal(cent[left], np.tile([6, 7], (left.sum(), 1)))
    np.testing.assert_array_equal(cent[~left], np.tile([6, 22], ((~left).sum(), 1)))
    clusters = cluster_centroids(disp, cent, thresh=2.5)
    # nobody lands outside the two centroid regions, so the ids are exactly 0 (left) and 1 (right)
    np.testing.assert_array_equal(clusters, (~left).astype(int))
    one_hot = to_one_hot(clusters)
    assert one_hot.shape == (2, 12, 30)
    np.testing.assert_array_equal(one_hot[0], left)


def test_landing_outside_is_cluster_zero_and_clipping():
    disp, left = _two_centre_field()
    # the right half now points far beyond the bottom-right corner: centroids are clipped to the grid
    disp[:, ~left] = np.array([100.0, 100.0])[:, None]
    cent = find_centroids(disp, n_iter=5)
    np.testing.assert_array_equal(cent[0, 29], [11, 29])
    clusters = cluster_centroids(disp, cent)
    np.testing.assert_array_equal(clusters, left.astype(int))  # 0 = landed outside, 1 = the left region


def test_detections_from_maps():
    h = w = 20
    keys = np.array([4, 9])  # k = 2 classes, N = 2 clusters -> channels (4, n0) (4, n1) (9, n0) (9, n1)
    rw = np.zeros((4, h, w), np.float32)
    rw[0, 1:6, 1:6] = 0.9  # two separate blobs in one channel -> two detections
    rw[0, 10:15, 1:6] = 0.6
    rw[3, 1:8, 12:19] = 1.0
    rw[3, 18, 0:3] = 0.8  # 3 pixels < 1 % of 400 -> score 0
    rw[1, 15:19, 15:19] = 0.2  # below the background threshold -> no detection
    det = detections_from_maps(rw, keys, n_clusters=2, bg_thres=0.25)
    assert det["mask"].shape == (4, h, w) and det["mask"].dtype == bool
    order = np.argsort(-det["mask"].sum(axis=(1, 2)))
    np.testing.assert_array_equal(det["mask"].sum(axis=(1, 2))[order], [49, 25, 25, 3])
    got = sorted(zip(det["class"].tolist(), det["score"].tolist(), strict=True))
    assert [c for c, _ in got] == [4, 4, 9, 9]
    assert [s for _, s in got] == pytest.approx([0.6, 0.9, 0.0, 1.0])
    empty = detections_from_maps(np.zeros((0, h, w)), np.zeros(0, int), n_clusters=3)
    assert empty["mask"].shape == (0, h, w) and empty["score"].shape == (0,)
    with pytest.raises(ValueError):
        detections_from_maps(rw, keys, n_clusters=3)


def test_rle_by_hand():
    # Column-major pixels of this 5x8 mask: 20 ones (columns 0-3), 3 zeros, 2 ones, 15 zeros
    # -> counts [0, 20, 3, 2, 15]. Counts from the 4th on are stored minus the count two before:
    # 0, 20, 3, 2-20=-18, 15-3=12. 5-bit groups, +0x20 when more follow, +48:
    # 0 -> '0'; 20 has bit 0x10 set so a 0 group follows: 52,0 -> 'd0'; 3 -> '3';
    # -18 = ...11101110: group 14 (+0x20 -> 46 '^'), then -1 -> group 31 'O'; 12 -> '<'.
    mask = np.zeros((5, 8), bool)
    mask[:, :4] = True
    mask[3:, 4] = True
    assert mask_to_rle(mask) == {"size": [5, 8], "counts": "0d03^O<"}
    np.testing.assert_array_equal(rle_to_mask({"size": [5, 8], "counts": "0d03^O<"}), mask)
    assert mask_to_rle(np.zeros((2, 3), bool))["counts"] == "6"
    assert mask_to_rle(np.ones((2, 3), bool))["counts"] == "06"


@pytest.mark.parametrize("density", [0.02, 0.5, 0.98])
def test_rle_round_trip(density):
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (7, 3), (64, 97), (375, 500)]:
        mask = rng.random(shape) < density
        rle = mask_to_rle(mask)
        assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(rle_to_mask(rle), mask)
    blocks = np.kron(rng.random((20, 25)) < 0.5, np.ones((19, 20), bool))  # long runs, multi-char counts
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(blocks)), blocks)


def test_coco_json():
    mask = np.zeros((6, 7), bool)
    mask[2:5, 1:3] = True
    det = {"mask": mask[None], "class": np.array([14]), "score": np.array([0.75], np.float32)}
    empty = {"mask": np.zeros((0, 4, 4), bool), "class": np.zeros(0, int), "score": np.zeros(0)}
    names = [f"c{i}" for i in range(20)]
    out = coco_json(["2007_000032", "2007_000039"], [(6, 7), (4, 4)], [det, empty], names)
    assert [im["id"] for im in out["images"]] == [1, 2]
    assert out["images"][0] == {"id": 1, "file_name": "2007_000032.jpg", "height": 6, "width": 7}
    assert out["categories"][0]["id"] == 1
    assert out["categories"][19] == {"id": 20, "name": "c19", "supercategory": "voc"}
    (ann,) = out["annotations"]
    assert ann["image_id"] == 1 and ann["category_id"] == 15 and ann["area"] == 6
    assert ann["bbox"] == [1, 2, 2, 3] == mask_to_bbox(mask)
    assert ann["score"] == pytest.approx(0.75)
    np.testing.assert_array_equal(rle_to_mask(ann["segmentation"]), mask)
