import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

pytest.importorskip("pydensecrf")
from misc.crf import crf_inference_label, crf_inference_prob, ir_label_from_cam  # noqa: E402


def _photo_and_reference():
    """A downscaled real photo and a clean 3-label map that follows its intensity edges."""
    data = pytest.importorskip("skimage.data")
    img = np.asarray(Image.fromarray(data.coffee()).resize((150, 100), Image.BILINEAR))
    gray = ndimage.gaussian_filter(img.mean(axis=2), 1.0)
    ref = np.digitize(gray, np.quantile(gray, [1 / 3, 2 / 3]))
    return img, ndimage.median_filter(ref, 5)


def test_crf_label_snaps_to_edges():
    img, ref = _photo_and_reference()
    rng = np.random.default_rng(0)
    # misaligned by 3 pixels and 30 % of the pixels replaced by random labels
    noisy = np.roll(ref, 3, axis=1)
    noisy = np.where(rng.random(ref.shape) < 0.3, rng.integers(0, 3, ref.shape), noisy)
    out = crf_inference_label(img, noisy, n_labels=3)
    assert out.shape == ref.shape and out.min() >= 0 and out.max() <= 2
    before, after = (noisy == ref).mean(), (out == ref).mean()
    assert after > before + 0.15, (before, after)
    # misalignment alone: the CRF moves the boundaries back towards the image edges
    shifted = np.roll(ref, 3, axis=1)
    assert (crf_inference_label(img, shifted, 3) == ref).mean() > (shifted == ref).mean() + 0.03


def test_crf_label_single_label_and_bad_input():
    img = np.zeros((4, 5, 3), np.uint8)
    np.testing.assert_array_equal(crf_inference_label(img, np.zeros((4, 5), int), 1), 0)
    with pytest.raises(ValueError):
        crf_inference_label(img, np.full((4, 5), 3), 3)
    with pytest.raises(ValueError):
        crf_inference_label(img[:, :4], np.zeros((4, 5), int), 2)


def test_crf_prob_keeps_shape_and_confident_labels():
    img, ref = _photo_and_reference()
    probs = np.full((3, *ref.shape), 0.1, np.float32)
    np.put_along_axis(probs, ref[None], 0.8, axis=0)
    q = crf_inference_prob(img, probs)
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(axis=0), 1, atol=1e-4)
    assert (q.argmax(axis=0) == ref).mean() > 0.9


def _rings(h=60, w=60):
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - h / 2, xx - w / 2)
    return r < 12, (r >= 12) & (r < 22)


def test_ir_label_from_cam_three_zones():
    core, ring = _rings()
    img = np.full((60, 60, 3), 30, np.uint8)
    img[core] = (220, 40, 40)
    img[ring] = (40, 200, 60)
    cam = np.zeros((2, 60, 60), np.float32)
    cam[0][core] = 1.0  # above conf_fg_thres 0.30
    cam[0][ring] = 0.15  # between 0.05 and 0.30
    out = ir_label_from_cam(img, cam, keys=np.array([11, 4]), fg_thres=0.30, bg_thres=0.05)
    assert out.shape == (60, 60) and out.dtype == np.uint8
    assert out[30, 30] == 12  # confident class 11 -> 12
    assert out[30, 30 + 17] == 255  # ring: not confident either way
    assert out[2, 2] == 0  # low CAM everywhere: background
    assert set(np.unique(out)) <= {0, 12, 255}


def test_ir_label_from_cam_no_class():
    img = np.zeros((8, 9, 3), np.uint8)
    out = ir_label_from_cam(img, np.zeros((0, 8, 9), np.float32), np.zeros(0, np.int64))
    assert out.shape == (8, 9) and out.dtype == np.uint8 and not out.any()
