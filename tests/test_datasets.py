"""COCO 2014 and Cityscapes descriptions, and the COCO-layout demo."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset import get_dataset
from dataset.base import read_id_list
from dataset.cityscapes import Cityscapes
from dataset.coco14 import COCO14
from dataset.labels import resolve_labels
from misc.errors import UserError
from misc.io import load_png, save_png
from voc12 import demo

COCO_SMALL = {"n_train": 12, "n_val": 6}
CITY_TRAIN = ("aachen_000000_000019", "aachen_000001_000019")
CITY_VAL = "frankfurt_000000_000294"
# Cityscapes' labelId -> trainId table, written out here independently of the module's.
TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
            27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _classes(mask: np.ndarray, offset: int) -> set[int]:
    return {int(v) - offset for v in np.unique(mask) if v != 255 and v >= offset}


# ---- COCO 2014


@pytest.fixture(scope="module")
def coco_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.make_demo_coco(tmp_path_factory.mktemp("coco") / "coco", seed=0, **COCO_SMALL)


def test_coco_id_to_split_folder(tmp_path: Path) -> None:
    info = COCO14(tmp_path)
    # The prefix decides, without looking at the disk.
    assert info.image("COCO_val2014_000000000042") == tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    assert info.seg_class("COCO_train2014_000000000009") == (
        tmp_path / "SegmentationClass" / "train2014" / "COCO_train2014_000000000009.png")
    # Without the prefix: train2014 then val2014, where the image or the mask is.
    _touch(tmp_path / "val2014" / "img1.jpg")
    _touch(tmp_path / "SegmentationClass" / "val2014" / "img2.png")
    _touch(tmp_path / "train2014" / "img3.jpg")
    _touch(tmp_path / "val2014" / "img3.jpg")
    assert [info.split_folder(i) for i in ("img1", "img2", "img3")] == ["val2014", "val2014", "train2014"]
    # Found ids are cached; an id found nowhere is placed in train2014 and looked up again next time.
    (tmp_path / "val2014" / "img1.jpg").unlink()
    assert info.image("img1") == tmp_path / "val2014" / "img1.jpg"
    assert info.image("img4") == tmp_path / "train2014" / "img4.jpg"
    _touch(tmp_path / "val2014" / "img4.jpg")
    assert info.image("img4") == tmp_path / "val2014" / "img4.jpg"


def test_coco_demo_has_high_class_ids_and_labels_match_masks(coco_demo: Path, tmp_path: Path) -> None:
    info = get_dataset("coco14", coco_demo).check()
    assert isinstance(info, COCO14)
    train = read_id_list(info.list_path("train", tmp_path))
    val = read_id_list(info.list_path("val", tmp_path))
    assert (len(train), len(val)) == (12, 6) and not set(train) & set(val)
    assert all(i.startswith("COCO_train2014_") for i in train) and all(i.startswith("COCO_val2014_") for i in val)
    masks = {i: load_png(info.seg_class(i)) for i in train + val}
    for i, mask in masks.items():
        with Image.open(info.image(i)) as img:
            assert img.format == "JPEG" and img.size[::-1] == mask.shape
    values = set().union(*(np.unique(m).tolist() for m in masks.values()))
    assert {21, 78} <= values  # elephant and teddy bear: beyond VOC's 20 mask values
    assert values <= {0, 255} | {v + 1 for v in range(80)}
    expected = {info.class_names.index(c) + 1 for c in demo.COCO_CLASS_OF_SHAPE.values()}
    assert values - {0, 255} <= expected

    labels = resolve_labels(info, train + val, tmp_path / "cls_labels.tsv")
    for i, mask in masks.items():
        assert labels[i].shape == (80,)
        assert set(np.flatnonzero(labels[i]).tolist()) == _classes(mask, 1), i
    assert any(labels[i][info.class_names.index("teddy bear")] for i in masks)


def test_coco_demo_deterministic_idempotent_and_refuses_foreign(coco_demo: Path, tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    again = demo.make_demo_coco(tmp_path / "again", seed=0, **COCO_SMALL)
    assert files(again) == files(coco_demo)
    jpg = next((again / "train2014").iterdir())
    stamp = jpg.stat().st_mtime_ns
    demo.make_demo_coco(again, seed=0, **COCO_SMALL)
    assert jpg.stat().st_mtime_ns == stamp  # complete: nothing rewritten
    demo.make_demo_coco(again, seed=1, **COCO_SMALL)
    assert jpg.read_bytes() != files(coco_demo)[str(jpg.relative_to(again))]

    real = tmp_path / "real"
    _touch(real / "val2014" / "COCO_val2014_000000000042.jpg")  # a real COCO name, not a demo one
    with pytest.raises(UserError, match="COCO_val2014_000000000042.jpg"):
        demo.make_demo_coco(real, **COCO_SMALL)
    assert not (real / "train2014").exists()


def test_coco_list_path_follows_the_folder(tmp_path: Path) -> None:
    root, cache = tmp_path / "coco", tmp_path / "cache"
    info = COCO14(root)
    for i in (3, 1, 2):
        _touch(root / "SegmentationClass" / "train2014" / f"COCO_train2014_{i:012d}.png")
    _touch(root / "train2014" / "COCO_train2014_000000000004.jpg")  # an image without a mask: not listed
    _touch(root / "val2014" / "COCO_val2014_000000000007.jpg")  # no val masks: the images are listed

    path = info.list_path("train", cache)
    assert path == cache / "coco14" / "train.txt"
    assert read_id_list(path) == [f"COCO_train2014_{i:012d}" for i in (1, 2, 3)]
    assert read_id_list(info.list_path("val", cache)) == ["COCO_val2014_000000000007"]
    # Rescanned on every call: a mask added since is listed, an unchanged list is not rewritten.
    mtime = path.stat().st_mtime_ns
    assert info.list_path("train", cache) == path and path.stat().st_mtime_ns == mtime
    _touch(root / "SegmentationClass" / "train2014" / "COCO_train2014_000000000005.png")
    assert len(read_id_list(info.list_path("train", cache))) == 4
    # The folder's own list wins; test has none.
    own = _touch(root / "ImageSets" / "train.txt", b"COCO_train2014_000000000002\n")
    assert info.list_path("train", cache) == own
    assert info.list_path("test", cache) is None
    assert COCO14(tmp_path / "empty").list_path("val", tmp_path / "cache2") is None


def test_mask_value_outside_encoding_names_the_file(tmp_path: Path) -> None:
    coco = COCO14(tmp_path)
    assert coco.classes_in_mask(np.array([[0, 1, 80, 255]], np.uint8), "m.png") == [0, 79]
    with pytest.raises(UserError, match=r"bad\.png"):
        coco.classes_in_mask(np.array([[0, 81]], np.uint8), "bad.png")
    # Through the label derivation too.
    _touch(tmp_path / "train2014" / "COCO_train2014_000000000001.jpg")
    mask = tmp_path / "SegmentationClass" / "train2014" / "COCO_train2014_000000000001.png"
    mask.parent.mkdir(parents=True)
    save_png(mask, np.full((4, 4), 90, np.uint8))
    with pytest.raises(UserError, match="COCO_train2014_000000000001.png"):
        resolve_labels(coco, ["COCO_train2014_000000000001"], tmp_path / "labels.tsv")
    with pytest.raises(UserError, match=r"city\.png"):
        Cityscapes(tmp_path).classes_in_mask(np.array([[0, 19]], np.uint8), "city.png")


@pytest.mark.parametrize("cls, name", [(COCO14, "coco14"), (Cityscapes, "cityscapes")])
def test_check_names_the_flag(tmp_path: Path, cls: type, name: str) -> None:
    with pytest.raises(UserError, match=rf"does not exist.*--dataset {name} --data_root"):
        cls(tmp_path / "missing").check()
    with pytest.raises(UserError, match="does not look like"):
        cls(tmp_path).check()


# ---- Cityscapes


def _label_ids() -> np.ndarray:
    """(32, 64) uint8 labelIds holding every value 0..255."""
    return np.resize(np.arange(256, dtype=np.uint8), (32, 64))


@pytest.fixture
def city_root(tmp_path: Path) -> Path:
    """Two cities: aachen (train, labelTrainIds masks) and frankfurt (val, only a labelIds mask)."""
    root = tmp_path / "cityscapes"
    rng = np.random.default_rng(0)
    for split, image_id in [("train", i) for i in CITY_TRAIN] + [("val", CITY_VAL)]:
        city = image_id.split("_")[0]
        img = root / "leftImg8bit" / split / city / f"{image_id}_leftImg8bit.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(img)
        gt = root / "gtFine" / split / city
        gt.mkdir(parents=True, exist_ok=True)
        if split == "train":
            mask = np.full((32, 64), 255, np.uint8)
            mask[:, :20] = 0 if image_id == CITY_TRAIN[0] else 13
            mask[:8, 20:] = 18
            save_png(gt / f"{image_id}_gtFine_labelTrainIds.png", mask)
        else:
            save_png(gt / f"{image_id}_gtFine_labelIds.png", _label_ids())
    return root


def test_cityscapes_classes_and_palette() -> None:
    info = Cityscapes("unused")
    assert not info.has_background
    assert info.num_classes == info.num_labels == 19
    assert info.label_names == info.class_names
    assert info.class_names[0] == "road" and info.class_names[18] == "bicycle"
    assert info.classes_in_mask(np.array([[0, 18, 255]], np.uint8), "m.png") == [0, 18]
    palette = info.palette.reshape(256, 3)
    assert info.palette.shape == (768,) and COCO14("unused").palette.shape == (768,)
    assert palette[0].tolist() == [128, 64, 128] and palette[13].tolist() == [0, 0, 142]
    assert palette[18].tolist() == [119, 11, 32]
    assert not palette[19:].any()  # 19..254 and 255 (ignore) black


def test_cityscapes_split_lookup_and_paths(city_root: Path) -> None:
    info = Cityscapes(city_root).check()
    assert info.split_of(CITY_VAL) == "val" and info.split_of(CITY_TRAIN[0]) == "train"
    assert info.image(CITY_VAL) == city_root / "leftImg8bit/val/frankfurt" / f"{CITY_VAL}_leftImg8bit.png"
    assert info.image(CITY_VAL).is_file()
    # seg_class names the labelTrainIds file even where only labelIds exist.
    assert info.seg_class(CITY_VAL) == city_root / "gtFine/val/frankfurt" / f"{CITY_VAL}_gtFine_labelTrainIds.png"
    assert not info.seg_class(CITY_VAL).exists()
    # The file a training mask is read from (the full-mask bound's fingerprint) is the one that exists.
    assert info.training_mask_file(CITY_VAL).name == f"{CITY_VAL}_gtFine_labelIds.png"
    assert info.training_mask_file(CITY_TRAIN[1]) == info.seg_class(CITY_TRAIN[1])
    # A found split is cached; an unknown id is placed in train and looked up again.
    for top in ("leftImg8bit", "gtFine"):
        os.rename(city_root / top / "val", city_root / top / "test")
    assert info.split_of(CITY_VAL) == "val"
    assert Cityscapes(city_root).split_of(CITY_VAL) == "test"
    assert info.split_of("bonn_000000_000001") == "train"
    _touch(city_root / "leftImg8bit/val/bonn/bonn_000000_000001_leftImg8bit.png")
    assert info.split_of("bonn_000000_000001") == "val"


def test_cityscapes_read_mask_converts_label_ids(city_root: Path) -> None:
    info = Cityscapes(city_root)
    label_ids = _label_ids()
    expected = np.vectorize(lambda v: TRAIN_ID.get(int(v), 255), otypes=[np.uint8])(label_ids)
    got = info.read_mask(CITY_VAL)
    assert got.dtype == np.uint8 and got.shape == (32, 64)
    np.testing.assert_array_equal(got, expected)
    assert got[0, 7] == 0 and got[0, 26] == 13 and got[0, 33] == 18 and got[0, 6] == got[0, 34] == 255
    # trainIds masks are read as they are.
    np.testing.assert_array_equal(info.read_mask(CITY_TRAIN[1]), load_png(info.seg_class(CITY_TRAIN[1])))
    with pytest.raises(UserError, match="labelTrainIds.*labelIds"):
        info.read_mask("aachen_000099_000019")


def test_cityscapes_lists_and_labels(city_root: Path, tmp_path: Path) -> None:
    info = Cityscapes(city_root)
    cache = tmp_path / "cache"
    train = info.list_path("train", cache)
    assert train == cache / "cityscapes" / "train.txt" and read_id_list(train) == list(CITY_TRAIN)
    assert read_id_list(info.list_path("val", cache)) == [CITY_VAL]
    assert info.list_path("test", cache) is None
    _touch(city_root / "leftImg8bit/train/bonn/bonn_000000_000001_leftImg8bit.png")
    assert read_id_list(info.list_path("train", cache)) == sorted([*CITY_TRAIN, "bonn_000000_000001"])
    own = _touch(city_root / "ImageSets" / "train.txt", b"aachen_000000_000019\n")
    assert info.list_path("train", cache) == own

    ids = [*CITY_TRAIN, CITY_VAL]
    labels = resolve_labels(info, ids, tmp_path / "labels.tsv")
    assert {i: set(np.flatnonzero(labels[i]).tolist()) for i in ids} == {
        CITY_TRAIN[0]: {0, 18}, CITY_TRAIN[1]: {13, 18}, CITY_VAL: set(range(19))}


def test_max_side_scales_photos_and_masks_alike(tmp_path: Path) -> None:
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    photo = np.random.default_rng(0).integers(0, 255, (1500, 900, 3), dtype=np.uint8)
    Image.fromarray(photo).save(root / "JPEGImages" / "big.jpg")
    mask = np.zeros((1500, 900), np.uint8)
    mask[300:900, 100:500] = 12
    mask[1400:, :] = 255
    save_png(root / "SegmentationClass" / "big.png", mask, demo.voc_palette())
    save_png(root / "SegmentationObject" / "big.png", (mask == 12).astype(np.uint8), demo.voc_palette())

    full = get_dataset("voc12", root)
    assert full.read_photo("big").shape == (1500, 900, 3) and np.array_equal(full.read_mask("big"), mask)
    capped = get_dataset("voc12", root, max_side=500)
    img, gt = capped.read_photo("big"), capped.read_mask("big")
    assert img.shape == (500, 300, 3) and gt.shape == (500, 300)
    assert capped.read_training_mask("big").shape == capped.read_instances("big").shape == (500, 300)
    # Nearest: no value appears that the mask did not hold, and the object keeps its place (rows 100-300).
    assert set(np.unique(gt)) == {0, 12, 255}
    rows = np.nonzero((gt == 12).any(1))[0]
    assert rows.min() == 100 and rows.max() == 299
    assert get_dataset("voc12", root, max_side=2000).read_photo("big").shape == (1500, 900, 3)
