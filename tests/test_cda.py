"""CDA object bank (spec 10.2), composite samples (spec 10.3) and the make_aug_fg step."""

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cda.bank import build_bank, load_bank_index, load_object, select_object
from cda.composite import CompositeDataset, cap_size, make_composite, rotate_object
from dataset.labels import load_cls_labels, save_cls_labels
from dataset.samples import ClassificationDataset
from dataset.voc12 import VOC12
from misc.errors import UserError
from misc.io import save_json, save_png
from misc.pipeline import MANIFEST


def _disc(size, radius, value=1):
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    return ((((yy - c) ** 2 + (xx - c) ** 2) <= radius**2) * value).astype(np.uint8)


def _object(h, w, value, seed=0):
    """An in-memory bank entry: noisy RGB crop and a mask covering an inner ellipse."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    seg = ((((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2) <= 0.9).astype(np.uint8) * value
    return rng.integers(1, 255, (h, w, 3), dtype=np.uint8), seg


# --- bank selection -----------------------------------------------------------------------------------


def test_select_object_rules():
    mask = np.zeros((100, 100), np.uint8)
    mask[10:40, 20:70] = 8  # ratio 0.15 -> accepted, class 7, tight box
    assert select_object(mask, 20) == (7, (10, 20, 40, 70))
    two = mask.copy()
    two[50:60, 50:60] = 15
    assert select_object(two, 20) is None  # two classes
    void = mask.copy()
    void[0, 0] = 255
    assert select_object(void, 20) is None  # a third value (void)
    small = np.zeros((100, 100), np.uint8)
    small[:5, :] = 3  # ratio 0.05
    assert select_object(small, 20) is None
    large = np.zeros((100, 100), np.uint8)
    large[:75, :] = 3  # ratio 0.75
    assert select_object(large, 20) is None
    assert select_object(np.zeros((10, 10), np.uint8), 20) is None
    assert select_object(np.full((10, 10), 3, np.uint8), 20) is None  # no background value
    coco = np.zeros((10, 10), np.uint8)
    coco[:4] = 78  # teddy bear, a COCO class: kept with 80 classes, no VOC class
    assert select_object(coco, 80) == (77, (0, 0, 4, 10)) and select_object(coco, 20) is None
    single = np.zeros((100, 100), np.uint8)
    single[30:90, 40:90] = 1  # ratio 0.3
    assert select_object(single, 20) == (0, (30, 40, 90, 90))


def test_select_object_boundaries_and_blobs():
    edge = np.zeros((10, 10), np.uint8)
    edge[:1, :] = 20  # ratio exactly 0.1: bounds are inclusive
    assert select_object(edge, 20) == (19, (0, 0, 1, 10))
    blobs = np.zeros((100, 100), np.uint8)
    blobs[5:20, 10:30] = 12
    blobs[60:95, 70:98] = 12
    assert select_object(blobs, 20) == (11, (5, 10, 95, 98))  # one box around all blobs of the class


# --- composite ----------------------------------------------------------------------------------------


def test_cap_size():
    assert cap_size(100, 50, 100, 100) == (70, 35)  # height capped, aspect kept
    assert cap_size(50, 200, 100, 100) == (17, 70)  # width capped: h = 70 / 4 = 17.5 -> 17
    assert cap_size(30, 40, 100, 100) == (30, 40)  # never enlarged
    assert cap_size(300, 300, 101, 57) == (39, 39)  # both caps: 0.7 * 57 = 39.9 -> 39
    assert cap_size(1000, 1, 100, 100) == (70, 1)  # truncation to 0 is kept at 1 pixel


@pytest.mark.parametrize("angle", [13, 37, 45, -71, 90])
def test_rotation_keeps_area(angle):
    img = np.full((121, 121, 3), 200, np.uint8)
    disc = _disc(121, 55, value=5)
    rect = np.zeros((121, 121), np.uint8)
    rect[20:100, 5:116] = 5
    for seg in (disc, rect):
        rot_img, rot_seg = rotate_object(img, seg, angle)
        assert set(np.unique(rot_seg)) == {0, 5}  # nearest: no new values
        assert abs((rot_seg != 0).sum() / (seg != 0).sum() - 1) < 0.03
        # canvas expansion: nothing is cut, the rotated square fits its canvas
        assert rot_img.shape[:2] == rot_seg.shape and min(rot_seg.shape) >= 121
        assert rot_img.dtype == np.uint8
    _, cubic = rotate_object(img, disc, angle, mask_order=3)
    _, nearest = rotate_object(img, disc, angle)
    if angle % 90:  # a quarter turn is an exact pixel permutation; other angles: the cubic mask dilates
        assert (cubic != 0).sum() > (nearest != 0).sum()


def test_composite_label_union_and_geometry():
    bank = {7: [_object(150, 250, 8, seed=1)], 14: [_object(20, 30, 15, seed=2)]}
    img = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    label = np.zeros(20, np.float32)
    label[[2, 14]] = 1
    for seed in range(20):
        comp, new_label, paste = make_composite(img, label, bank, np.random.default_rng(seed))
        assert comp.shape == img.shape and comp.dtype == np.uint8 and new_label.dtype == np.float32
        # person (14) is in the image, so cat (7) is the only absent class with bank objects
        expected = label.copy()
        expected[7] = 1
        np.testing.assert_array_equal(new_label, expected)
        assert label[7] == 0 and paste.any()
        np.testing.assert_array_equal(comp[~paste], img[~paste])  # hard paste only inside the mask
        rows, cols = np.flatnonzero(paste.any(1)), np.flatnonzero(paste.any(0))
        assert rows[-1] - rows[0] + 1 <= int(0.7 * 60) and cols[-1] - cols[0] + 1 <= int(0.7 * 80)


def test_composite_object_larger_than_image_is_not_cut():
    # A disc object: if any part were cut by the image border its pasted bbox would stop being square.
    disc = _disc(200, 97, value=3)
    bank = {2: [(np.full((200, 200, 3), 255, np.uint8), disc)]}
    img = np.zeros((50, 90, 3), np.uint8)
    for seed in range(15):
        _, _, paste = make_composite(img, np.zeros(20, np.float32), bank, np.random.default_rng(seed))
        rows, cols = np.flatnonzero(paste.any(1)), np.flatnonzero(paste.any(0))
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert abs(h - w) <= 2 and h <= 35
        assert abs(paste.sum() / (np.pi * h * w / 4) - 1) < 0.15


def test_composite_rescale_option_stays_inside():
    bank = {0: [_object(40, 40, 1)]}
    img = np.zeros((50, 50, 3), np.uint8)
    sizes = set()
    for seed in range(30):
        _, _, paste = make_composite(
            img, np.zeros(20, np.float32), bank, np.random.default_rng(seed), max_size=0.95, rescale=(0.8, 1.2)
        )
        rows = np.flatnonzero(paste.any(1))
        sizes.add(rows[-1] - rows[0])
    assert len(sizes) > 3  # the random scale varies the size


def test_composite_without_candidate_class_is_unchanged():
    bank = {3: [_object(10, 10, 4)], 5: []}
    img = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    label = np.zeros(20, np.float32)
    label[3] = 1
    comp, new_label, paste = make_composite(img, label, bank, np.random.default_rng(0))
    np.testing.assert_array_equal(comp, img)
    np.testing.assert_array_equal(new_label, label)
    assert not paste.any()


def test_composite_reproducible_and_class_sampling():
    bank = {c: [_object(30, 40, c + 1, seed=c), _object(25, 20, c + 1, seed=50 + c)] for c in range(20)}
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    label = np.zeros(20, np.float32)
    label[0] = 1
    rng = np.random.default_rng
    a = make_composite(img, label, bank, rng(123))
    b = make_composite(img, label, bank, rng(123))
    c = make_composite(img, label, bank, rng(124))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    pasted = [int(np.flatnonzero(make_composite(img, label, bank, rng(s))[1])[-1]) for s in range(200)]
    assert 0 not in pasted and len(set(pasted)) >= 15  # uniform over the 19 absent classes
    # class_weights="bank": every object equally likely, so a class with 9 of 10 objects wins ~90 %
    small = {1: [_object(6, 6, 2)] * 9, 2: [_object(6, 6, 3)]}
    picks = [make_composite(img, label, small, rng(s), class_weights="bank")[1][1] for s in range(200)]
    assert 0.8 < np.mean(picks) < 0.97


# --- bank files, dataset and step ---------------------------------------------------------------------


@pytest.fixture
def voc(tmp_path):
    """A 4-image VOC root, round-1 pseudo masks (2 selectable) and image-level labels."""
    root, masks = tmp_path / "voc", tmp_path / "sem_seg"
    rng = np.random.default_rng(0)
    shapes = {"a": (48, 64), "b": (40, 40), "c": (56, 48), "d": (32, 64)}
    mask_values = {"a": [8], "b": [8, 15], "c": [15], "d": []}
    labels = {}
    for name, (h, w) in shapes.items():
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        mask = np.zeros((h, w), np.uint8)
        for k, v in enumerate(mask_values[name]):
            mask[4 + 10 * k : 14 + 10 * k + 8, 6 : w - 6] = v
        save_png(masks / f"{name}.png", mask)
        labels[name] = np.zeros(20, np.float32)
        labels[name][[v - 1 for v in mask_values[name]] or [4]] = 1
    save_json(masks / MANIFEST, {"fingerprint": "round1"})
    save_cls_labels(tmp_path / "cls_labels.tsv", labels)
    (tmp_path / "train.txt").write_text("a\nb\nc\nd\n")
    return tmp_path, root, masks, sorted(shapes)


def test_bank_round_trip_and_resume(voc):
    tmp, root, masks, ids = voc
    bank_dir = tmp / "bank"
    with pytest.raises(UserError, match="run make_aug_fg first"):
        load_bank_index(bank_dir, VOC12(root))
    counts = build_bank(VOC12(root), ids, masks, bank_dir, progress=False)
    assert counts[7] == 1 and counts[14] == 1 and sum(counts.values()) == 2
    bank = load_bank_index(bank_dir, VOC12(root))
    assert [p.name for p in bank[7]] == ["a.npz"] and bank[7][0].parent.name == "cat"
    assert [p.name for p in bank[14]] == ["c.npz"] and bank[0] == []
    img, seg = load_object(bank[7][0])
    full = np.asarray(Image.open(root / "JPEGImages" / "a.jpg").convert("RGB"))
    assert img.dtype == np.uint8 and seg.dtype == np.uint8 and set(np.unique(seg)) == {8}
    np.testing.assert_array_equal(img, full[4:22, 6:58])  # the tight box of the mask
    mtime = os.stat(bank[7][0]).st_mtime_ns
    assert build_bank(VOC12(root), ids, masks, bank_dir, progress=False) == counts
    assert os.stat(bank[7][0]).st_mtime_ns == mtime  # resumed: existing objects are not rewritten
    bank[14][0].unlink()
    with pytest.raises(UserError, match="stale"):
        load_bank_index(bank_dir, VOC12(root))


def test_composite_dataset(voc):
    tmp, root, masks, ids = voc
    build_bank(VOC12(root), ids, masks, tmp / "bank", progress=False)
    labels = load_cls_labels(tmp / "cls_labels.tsv", 20)
    base = ClassificationDataset(VOC12(root), ids, labels, resize_long=(40, 56), crop_size=32)
    ds = CompositeDataset(base, load_bank_index(tmp / "bank", VOC12(root)), seed=3)
    item = ds[0]  # "a" holds a cat, so a person is pasted
    assert set(item) == {"name", "img", "label", "img_aug", "label_aug"}
    assert item["img"].shape == item["img_aug"].shape == (3, 32, 32)
    assert item["label"].dtype == item["label_aug"].dtype == torch.float32
    assert item["label_aug"][14] == 1 and item["label"][14] == 0
    again = ds[0]
    assert torch.equal(item["img_aug"], again["img_aug"]) and torch.equal(item["img"], again["img"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["img_aug"], item["img_aug"])


def _step_args(tmp, root, masks):
    return argparse.Namespace(
        dataset="voc12", data_root=str(root), train_list=str(tmp / "train.txt"), bank_masks_dir=str(masks),
        cda_bank_dir=str(tmp / "bank"), cls_labels=str(tmp / "cls_labels.tsv"), seed=0, cda_min_ratio=0.1,
        cda_max_ratio=0.7, cda_max_size=0.7, cda_max_angle=90, cda_mask_order=0,
    )  # fmt: skip


def test_make_aug_fg_step(voc):
    from step import make_aug_fg

    tmp, root, masks, _ = voc
    args = _step_args(tmp, root, masks)
    make_aug_fg.run(args)
    bank = load_bank_index(args.cda_bank_dir, VOC12(root))
    assert sum(len(v) for v in bank.values()) == 2
    with Image.open(tmp / "bank" / "composites.png") as grid:
        assert grid.size == (4 * 256, 3 * (256 + 30)) and grid.mode == "RGB"
        assert np.asarray(grid).max() > 0
    # other ratio bounds -> the stale bank is rebuilt from scratch
    args.cda_min_ratio = 0.4
    make_aug_fg.run(args)
    assert sum(len(v) for v in load_bank_index(args.cda_bank_dir, VOC12(root)).values()) == 0
    assert not list((tmp / "bank").glob("*/*.npz"))
    (masks / "c.png").unlink()
    with pytest.raises(UserError, match="1 of 4 outputs of make_sem_seg_labels are missing"):
        make_aug_fg.run(args)


def test_composite_dataset_rejects_unknown_options_at_construction():
    from cda.composite import CompositeDataset

    with pytest.raises(TypeError):
        CompositeDataset(None, {}, max_sise=0.7)
