import json
import math

import numpy as np
import pytest

from misc.metrics import (
    confusion_matrix,
    instance_ap,
    instances_from_voc,
    seed_confusion,
    seed_scores,
    segmentation_scores,
    voc_ap,
)

NAMES = ["background", "a", "b", "c"]


def test_confusion_and_scores_by_hand():
    gt = np.array([[0, 0, 1, 1], [0, 1, 1, 255], [2, 2, 0, 0]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [2, 0, 0, 255]])
    # (1,3) is void in GT and skipped; predicted 255 at (2,3) counts as background.
    # conf rows = GT, cols = prediction:   bg: 4 -> bg, 1 -> a;  a: 1 -> bg, 3 -> a;  b: 1 -> bg, 1 -> b
    conf = confusion_matrix(gt, pred, num_classes=4)
    expected = np.array([[4, 1, 0, 0], [1, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(conf, expected)
    assert conf.dtype == np.int64

    s = segmentation_scores(conf, NAMES)
    # GT sizes 5, 4, 2; predicted sizes 6, 4, 1; TP 4, 3, 1.
    # IoU: bg 4/(5+6-4) = 4/7, a 3/(4+4-3) = 3/5, b 1/(2+1-1) = 1/2; c absent -> excluded.
    assert s["per_class"]["background"] == pytest.approx(100 * 4 / 7)
    assert s["per_class"]["a"] == pytest.approx(60.0)
    assert s["per_class"]["b"] == pytest.approx(50.0)
    assert s["per_class"]["c"] is None
    assert s["miou"] == pytest.approx(100 * (4 / 7 + 3 / 5 + 1 / 2) / 3)  # 55.714
    # precision TP/pred: 4/6, 3/4, 1/1; recall TP/GT: 4/5, 3/4, 1/2
    assert s["precision"]["background"] == pytest.approx(100 * 4 / 6)
    assert s["precision"]["b"] == pytest.approx(100.0)
    assert s["recall"]["b"] == pytest.approx(50.0)
    assert s["mean_precision"] == pytest.approx(100 * (4 / 6 + 3 / 4 + 1) / 3)
    assert s["mean_recall"] == pytest.approx(100 * (4 / 5 + 3 / 4 + 1 / 2) / 3)
    # fp = (pred-TP)/union: bg 2/7, a 1/5, b 0/2;  fn = (GT-TP)/union: bg 1/7, a 1/5, b 1/2
    assert s["bg_fp"] == pytest.approx(100 * 2 / 7)
    assert s["bg_fn"] == pytest.approx(100 * 1 / 7)
    assert s["fg_fp_mean"] == pytest.approx(10.0)
    assert s["fg_fn_mean"] == pytest.approx(35.0)
    assert s["pixel_acc"] == pytest.approx(100 * 8 / 11)
    json.dumps(s, allow_nan=False)


def test_confusion_sums_over_images_and_rejects_bad_gt():
    gt = np.array([[0, 1]])
    total = confusion_matrix(gt, gt, 2) + confusion_matrix(gt, np.array([[1, 1]]), 2)
    np.testing.assert_array_equal(total, [[1, 1], [0, 2]])
    with pytest.raises(ValueError):
        confusion_matrix(np.array([[5]]), np.array([[0]]), 2)


def test_seed_scores_by_hand():
    # 0 background, 1 and 2 objects; seeds 255 = unlabelled; one void GT pixel.
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 0]])
    seeds = np.array([[0, 255, 1, 0], [0, 0, 255, 1], [1, 2, 2, 255]])
    conf = seed_confusion(gt, seeds, 3)
    np.testing.assert_array_equal(conf, [[3, 0, 0, 2], [1, 2, 0, 1], [0, 1, 1, 0]])
    s = seed_scores(conf, ["bg", "a", "b"])
    # fg: 3 correct of 4 fg-seeded pixels, of 6 GT object pixels; bg: 3 of 4 bg seeds, of 5 GT bg pixels.
    assert (s["fg_precision"], s["fg_recall"]) == (pytest.approx(75.0), pytest.approx(50.0))
    assert (s["bg_precision"], s["bg_recall"]) == (pytest.approx(75.0), pytest.approx(60.0))
    assert s["labelled"] == pytest.approx(100 * 8 / 11)
    assert s["precision"] == {"bg": pytest.approx(75.0), "a": pytest.approx(200 / 3), "b": pytest.approx(100.0)}
    assert s["recall"]["b"] == pytest.approx(50.0)
    no_fg = seed_scores(seed_confusion(np.zeros((2, 2), int), np.zeros((2, 2), int), 3), ["bg", "a", "b"])
    assert no_fg["fg_precision"] is None and no_fg["bg_precision"] == 100.0
    json.dumps(no_fg, allow_nan=False)


def test_voc_ap_envelope():
    # recall 0.5 at precision 1, then a FP, then recall 1 at precision 2/3: 0.5*1 + 0.5*2/3
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(5 / 6)


def _square(y0, x0, size=4, shape=(10, 10)):
    m = np.zeros(shape, bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


def _ap(preds, labels, scores, gts, gt_labels, **kw):
    return instance_ap(
        [np.array(preds)], [np.array(labels)], [np.array(scores)], [np.array(gts)], [np.array(gt_labels)], 20, **kw
    )


def test_instance_ap_perfect_and_absent_classes():
    a, b = _square(0, 0), _square(5, 5)
    ap, m = _ap([a, b], [0, 3], [0.9, 0.8], [a, b], [0, 3])
    assert ap[0] == 1 and ap[3] == 1 and m == 1
    assert np.isnan(ap[1]) and np.isnan(ap).sum() == 18


def test_instance_ap_duplicate_ranked_second():
    a, b = _square(0, 0), _square(5, 5)
    # sorted: A (TP), A again (FP, A already matched), B (TP); 2 GT
    # recall .5 .5 1, precision 1 .5 2/3 -> AP = .5*1 + .5*2/3 = 5/6
    ap, m = _ap([a, a, b], [0, 0, 0], [0.9, 0.8, 0.7], [a, b], [0, 0])
    assert ap[0] == pytest.approx(5 / 6) and m == pytest.approx(5 / 6)


def test_instance_ap_false_positive_first_and_miss():
    a, b, far = _square(0, 0), _square(5, 5), _square(0, 6)
    # FP then TP with one GT: recall 0, 1; precision 0, 1/2 -> AP = 1/2
    ap, _ = _ap([far, a], [0, 0], [0.9, 0.5], [a], [0])
    assert ap[0] == pytest.approx(0.5)
    # one of two GT found: recall .5 at precision 1 -> AP = 1/2; a class with GT but no detection -> 0
    ap, m = _ap([a], [0], [0.9], [a, b, b], [0, 0, 1])
    assert ap[0] == pytest.approx(0.5) and ap[1] == 0 and m == pytest.approx(0.25)


def test_instance_ap_iou_threshold_and_void():
    gt = _square(0, 0)  # 16 pixels
    half = np.zeros((10, 10), bool)
    half[0:2, 0:4] = True  # IoU 8/16 = 0.5
    assert _ap([half], [0], [1.0], [gt], [0], iou_thresh=0.25)[0][0] == 1
    assert _ap([half], [0], [1.0], [gt], [0], iou_thresh=0.75)[0][0] == 0
    # a prediction covering the GT plus its 20-pixel void border: IoU 16/36 without, 1 with the void mask
    big = _square(0, 0, size=6)
    void = big & ~gt
    assert _ap([big], [0], [1.0], [gt], [0])[0][0] == 0
    ap, _ = instance_ap([big[None]], [[0]], [[1.0]], [gt[None]], [[0]], 20, gt_void=[void])
    assert ap[0] == 1


def test_instance_ap_images_without_predictions():
    a = _square(0, 0)
    ap, m = instance_ap([a[None], np.zeros((0, 10, 10), bool)], [[0], []], [[0.9], []], [a[None], a[None]], [[0], [0]],
                        20)
    assert ap[0] == pytest.approx(0.5) and m == pytest.approx(0.5)


def test_instances_from_voc():
    obj = np.array([[0, 1, 1], [2, 2, 255], [0, 3, 0]], np.uint8)
    cls = np.array([[0, 15, 15], [7, 7, 255], [0, 15, 0]], np.uint8)
    masks, labels = instances_from_voc(obj, cls)
    assert masks.shape == (3, 3, 3) and masks.dtype == bool
    np.testing.assert_array_equal(labels, [14, 6, 14])
    np.testing.assert_array_equal(masks[1], obj == 2)
    empty, none = instances_from_voc(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8))
    assert empty.shape == (0, 2, 2) and none.size == 0
    assert math.isnan(instance_ap([empty], [[]], [[]], [empty], [none], 20)[1])
