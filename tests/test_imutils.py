"""Resampling, crop, flip and normalisation semantics (spec 1.4-1.5) against hand-computed values."""

import numpy as np
import pytest

from misc import imutils


def _clone(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    return np.random.default_rng(seed), np.random.default_rng(seed)


def test_normalize_values() -> None:
    img = np.array([[[0, 128, 255]]], np.uint8)
    out = imutils.normalize(img)
    assert out.dtype == np.float32 and out.shape == (1, 1, 3)
    expected = [(0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("shape", "scale", "size"),
    [
        ((5, 7), 0.5, (2, 4)),  # 2.5 -> 2 and 3.5 -> 4: round half to even
        ((3, 9), 0.5, (2, 4)),  # 1.5 -> 2, 4.5 -> 4
        ((10, 10), 1.25, (12, 12)),  # 12.5 -> 12
        ((100, 60), 0.3333, (33, 20)),
    ],
)
def test_rescale_size_round_half_even(shape: tuple[int, int], scale: float, size: tuple[int, int]) -> None:
    assert imutils.scaled_size(shape, scale) == size
    img = np.zeros(shape + (3,), np.uint8)
    label = np.zeros(shape, np.uint8)
    assert imutils.rescale(img, scale, 3).shape == size + (3,)
    assert imutils.rescale(label, scale, 0).shape == size


def test_rescale_noop_and_nearest_keeps_label_values() -> None:
    label = np.array([[0, 1], [255, 20]], np.uint8)
    assert imutils.rescale(label, 1.0, 0) is label
    up = imutils.rescale(label, 3.0, 0)
    assert up.shape == (6, 6)
    np.testing.assert_array_equal(up[::3, ::3], label)
    assert set(np.unique(up)) == {0, 1, 20, 255}


def test_random_resize_long_range_inclusive() -> None:
    img = np.zeros((50, 80, 3), np.uint8)
    rng, ref = _clone(3)
    out = imutils.random_resize_long(img, 100, 102, rng)
    long_side = int(ref.integers(100, 103))
    assert out.shape == (round(50 * long_side / 80), long_side, 3)
    seen = {max(imutils.random_resize_long(img, 10, 12, np.random.default_rng(s)).shape[:2]) for s in range(40)}
    assert seen == {10, 11, 12}


def test_random_scale_joint() -> None:
    img = np.zeros((40, 30, 3), np.uint8)
    label = np.full((40, 30), 7, np.uint8)
    rng, ref = _clone(0)
    out_img, out_label = imutils.random_scale([img, label], (0.5, 1.5), rng)
    s = 0.5 + ref.random() * 1.0
    assert out_img.shape[:2] == out_label.shape == imutils.scaled_size((40, 30), s)
    assert set(np.unique(out_label)) == {7}


def test_random_lr_flip_joint() -> None:
    # The image encodes its column index; a flip applied to only one array would break the equality.
    cols = np.tile(np.arange(6, dtype=np.uint8), (3, 1))
    img = np.stack([cols, cols, cols], -1)
    flipped = set()
    for seed in range(10):
        rng, ref = _clone(seed)
        out_img, out_label = imutils.random_lr_flip([img, cols], rng)
        np.testing.assert_array_equal(out_img[..., 0], out_label)
        flip = ref.random() < 0.5
        np.testing.assert_array_equal(out_label, cols[:, ::-1] if flip else cols)
        flipped.add(flip)
    assert flipped == {True, False}


def test_random_crop_pads_small_image_into_container() -> None:
    img = np.arange(1, 13, dtype=np.float32).reshape(3, 4, 1).repeat(3, -1)
    label = np.arange(1, 13, dtype=np.uint8).reshape(3, 4)
    rng, ref = _clone(5)
    out_img, out_label = imutils.random_crop([img, label], 6, [0.0, 255], rng)
    cy, cx = int(ref.integers(0, 4)), int(ref.integers(0, 3))  # container offsets in [0, S - d]
    expected_label = np.full((6, 6), 255, np.uint8)
    expected_label[cy : cy + 3, cx : cx + 4] = label
    np.testing.assert_array_equal(out_label, expected_label)
    expected_img = np.zeros((6, 6, 3), np.float32)
    expected_img[cy : cy + 3, cx : cx + 4] = img
    np.testing.assert_array_equal(out_img, expected_img)


def test_random_crop_window_in_large_image() -> None:
    img = np.arange(80, dtype=np.uint8).reshape(10, 8)
    rng, ref = _clone(11)
    (out,) = imutils.random_crop([img], 4, [255], rng)
    iy, ix = int(ref.integers(0, 7)), int(ref.integers(0, 5))  # window offsets in [0, d - S]
    np.testing.assert_array_equal(out, img[iy : iy + 4, ix : ix + 4])
    # Offsets cover both ends of the range.
    corners = {int(imutils.random_crop([img], 4, [255], np.random.default_rng(s))[0][0, 0]) for s in range(300)}
    assert {int(img[0, 0]), int(img[6, 4])} <= corners


def test_random_crop_mixed_axes() -> None:
    img = np.arange(1, 8 * 3 + 1, dtype=np.uint8).reshape(8, 3)  # taller than S, narrower than S
    rng, ref = _clone(2)
    (out,) = imutils.random_crop([img], 5, [255], rng)
    iy = int(ref.integers(0, 4))
    cx = int(ref.integers(0, 3))
    expected = np.full((5, 5), 255, np.uint8)
    expected[:, cx : cx + 3] = img[iy : iy + 5]
    np.testing.assert_array_equal(out, expected)


def test_random_crop_rejects_mismatched_arrays() -> None:
    with pytest.raises(ValueError):
        imutils.random_crop([np.zeros((4, 4)), np.zeros((4, 5))], 3, [0, 0], np.random.default_rng(0))


def test_top_left_crop_and_chw() -> None:
    img = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    out = imutils.top_left_crop(img, 4, 0.0)
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[:2, :3], img)
    assert not out[2:].any() and not out[:, 3:].any()
    big = np.arange(36, dtype=np.uint8).reshape(6, 6)
    np.testing.assert_array_equal(imutils.top_left_crop(big, 4, 255), big[:4, :4])
    chw = imutils.hwc_to_chw(out)
    assert chw.shape == (3, 4, 4) and chw.flags.c_contiguous
    np.testing.assert_array_equal(chw[1], out[..., 1])
