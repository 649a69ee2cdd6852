"""The VOC description (layout, lists, labels), id lists, image reading and the torch datasets."""

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.base import read_id_list, read_image, voc_palette
from dataset.labels import load_cls_labels, resolve_labels, save_cls_labels
from dataset.samples import ClassificationDataset, ImageDataset, SegmentationDataset, single_collate
from dataset.voc12 import SHIPPED_DIR, VOC12
from misc import imutils
from misc.errors import UserError
from misc.io import save_png
from step import make_cls_labels

PALETTE = voc_palette()
CLASS_NAMES = VOC12.class_names


class _VOC(VOC12):
    """VOC with the test's own shipped labels (None: none shipped)."""

    def __init__(self, root: Path, shipped: Path | None) -> None:
        super().__init__(root)
        self.shipped = shipped

    def shipped_labels(self) -> Path | None:
        return self.shipped

XML = """<annotation>
  <filename>{name}.jpg</filename>
  {objects}
</annotation>
"""


def _xml(names: list[str]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>1</difficult><part><name>head</name></part></object>" for n in names
    )
    return XML.format(name="x", objects=objs)


def _block_image(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Four coloured quadrants and the matching label map (1..4): any misalignment shows up."""
    colours = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10]], np.uint8)
    label = np.ones((h, w), np.uint8)
    label[:, w // 2 :] += 1
    label[h // 2 :] += 2
    return colours[label - 1], label


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    """A tiny VOC root: a.jpg (XML), b.jpg (SegmentationClass only), c.jpg (SegmentationClassAug only)."""
    root = tmp_path / "VOC2012"
    layout = VOC12(root)
    for d in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationClassAug"):
        (root / d).mkdir(parents=True)
    for name, (h, w) in {"a": (40, 60), "b": (30, 20), "c": (50, 50)}.items():
        img, label = _block_image(h, w)
        Image.fromarray(img).save(layout.image(name), quality=95)
        if name == "b":
            save_png(layout.seg_class(name), label * 0 + np.array(15, np.uint8), PALETTE)
        if name == "c":
            mask = np.zeros((h, w), np.uint8)
            mask[5:10, 5:10], mask[20:30, 20:30], mask[0] = 3, 18, 255
            save_png(layout.seg_class_aug(name), mask, PALETTE)
    layout.annotation("a").write_text(_xml(["cat", "person", "cat", "unknownthing"]))
    # Labels for the segmentation datasets: the quadrant ids of a.
    save_png(tmp_path / "labels" / "a.png", _block_image(40, 60)[1])
    return root


# ---------------------------------------------------------------------------------------------------- lists, TSV


def test_class_names_and_palette() -> None:
    assert len(CLASS_NAMES) == 20 and CLASS_NAMES[0] == "aeroplane" and CLASS_NAMES[19] == "tvmonitor"
    pal = PALETTE.reshape(256, 3)
    assert PALETTE.dtype == np.uint8 and PALETTE.shape == (768,)
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[15].tolist() == [192, 128, 128]
    assert pal[255].tolist() == [224, 224, 192]


def test_read_id_list_keeps_strings(tmp_path: Path) -> None:
    p = tmp_path / "list.txt"
    p.write_text("2007_000032\n\n2012_004331  \n2100_000001\n")
    assert read_id_list(p) == ["2007_000032", "2012_004331", "2100_000001"]
    assert len(read_id_list(SHIPPED_DIR / "train_aug.txt")) == 10582
    with pytest.raises(UserError, match="missing"):
        read_id_list(tmp_path / "nope.txt")


def test_cls_labels_tsv_round_trip(tmp_path: Path) -> None:
    labels = {"2007_000032": np.eye(20, dtype=np.float32)[[0, 14]].sum(0), "x": np.zeros(20, np.float32)}
    labels["b"] = np.eye(20, dtype=np.float32)[19]
    save_cls_labels(tmp_path / "l.tsv", labels)
    assert (tmp_path / "l.tsv").read_text() == "2007_000032\t1 15\nb\t20\nx\t\n"
    back = load_cls_labels(tmp_path / "l.tsv", 20)
    assert back.keys() == labels.keys()
    for k, v in labels.items():
        assert back[k].dtype == np.float32 and back[k].shape == (20,)
        np.testing.assert_array_equal(back[k], v)


def test_shipped_labels() -> None:
    labels = load_cls_labels(SHIPPED_DIR / "cls_labels.tsv", 20)
    assert len(labels) == 12031
    assert np.flatnonzero(labels["2007_000032"]).tolist() == [0, 14]  # aeroplane, person


def test_load_cls_labels_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.tsv").write_text("a\t1 x\n")
    with pytest.raises(UserError, match="bad.tsv:1"):
        load_cls_labels(tmp_path / "bad.tsv", 20)
    (tmp_path / "range.tsv").write_text("a\t21\n")
    with pytest.raises(UserError, match="1..20"):
        load_cls_labels(tmp_path / "range.tsv", 20)
    with pytest.raises(UserError, match="make_cls_labels"):
        load_cls_labels(tmp_path / "none.tsv", 20)


# ---------------------------------------------------------------------------------------------------- derived labels


def test_labels_from_xml(tmp_path: Path) -> None:
    p = tmp_path / "a.xml"
    p.write_text(_xml(["dog", "person", "dog", "head", "unknown"]))
    assert np.flatnonzero(VOC12(tmp_path).derive_labels(p)).tolist() == [11, 14]
    p.write_text("<annotation><object><name>dog</name></annotation>")
    with pytest.raises(UserError, match="a.xml"):
        VOC12(tmp_path).derive_labels(p)


def test_labels_from_mask(tmp_path: Path) -> None:
    mask = np.array([[0, 3, 15], [255, 255, 0]], np.uint8)
    save_png(tmp_path / "m.png", mask, PALETTE)
    y = VOC12(tmp_path).derive_labels(tmp_path / "m.png")
    assert y.dtype == np.float32 and np.flatnonzero(y).tolist() == [2, 14]
    save_png(tmp_path / "bad.png", np.array([[0, 40]], np.uint8))
    with pytest.raises(UserError, match="bad.png"):
        VOC12(tmp_path).derive_labels(tmp_path / "bad.png")


def test_resolve_labels_derives_and_caches(voc_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = tmp_path / "shipped.tsv"
    shipped.write_text("2007_000032\t1 15\n")
    cache = tmp_path / "out" / "cls_labels.tsv"
    ids = ["2007_000032", "a", "b", "c", "a"]
    labels = resolve_labels(_VOC(voc_root, shipped), ids, cache)
    assert list(labels) == ["2007_000032", "a", "b", "c"]
    classes = {k: np.flatnonzero(v).tolist() for k, v in labels.items()}
    assert classes == {"2007_000032": [0, 14], "a": [7, 14], "b": [14], "c": [2, 17]}
    assert load_cls_labels(cache, 20).keys() == labels.keys()

    # Second run: nothing is derived again.
    def fail(self: VOC12, path: Path) -> np.ndarray:
        raise AssertionError(f"re-derived {path}")

    monkeypatch.setattr(VOC12, "derive_labels", fail)
    again = resolve_labels(_VOC(voc_root, shipped), ids, cache)
    assert {k: np.flatnonzero(v).tolist() for k, v in again.items()} == classes
    monkeypatch.undo()

    # A changed source (same id, new content) is derived again instead of reusing the stale cache.
    xml = VOC12(voc_root).annotation("a")
    xml.write_text(_xml(["dog"]))
    os.utime(xml, ns=(1, 1))
    changed = resolve_labels(_VOC(voc_root, shipped), ids, cache)
    assert np.flatnonzero(changed["a"]).tolist() == [11]
    assert np.flatnonzero(load_cls_labels(cache, 20)["a"]).tolist() == [11]


def test_resolve_labels_unlabelled_id(voc_root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no image-level label for zz"):
        resolve_labels(_VOC(voc_root, None), ["a", "zz"], tmp_path / "c.tsv")


def test_make_cls_labels_step(voc_root: Path, tmp_path: Path) -> None:
    lists = {}
    for split, ids in {"train": ["a", "b"], "val": ["c"], "infer": ["a"], "eval": ["b"]}.items():
        lists[split] = tmp_path / f"{split}.txt"
        lists[split].write_text("\n".join(ids) + "\n")
    args = argparse.Namespace(
        dataset="voc12",
        data_root=str(voc_root),
        train_list=str(lists["train"]),
        val_list=str(lists["val"]),
        infer_list=str(lists["infer"]),
        eval_list=str(lists["eval"]),
        cls_labels=str(tmp_path / "work" / "cls_labels.tsv"),
    )
    make_cls_labels.run(args)
    assert (tmp_path / "work" / "cls_labels.tsv").read_text() == "a\t8 15\nb\t15\nc\t3 18\n"


# ---------------------------------------------------------------------------------------------------- layout, images


def test_training_masks_prefer_sbd(voc_root: Path) -> None:
    layout = VOC12(voc_root)
    assert layout.training_mask_file("c") == layout.seg_class_aug("c")  # SBD only
    assert layout.training_mask_file("b") == layout.seg_class("b")  # VOC only
    assert [layout.has_training_mask(i) for i in "abc"] == [False, True, True]
    assert (layout.load_training_mask("c")[20:30, 20:30] == 18).all() and (layout.load_training_mask("b") == 15).all()


def test_layout_check(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist.*--voc12_root"):
        VOC12(tmp_path / "missing").check()
    (tmp_path / "notvoc").mkdir()
    with pytest.raises(UserError, match="does not look like VOC2012: expected JPEGImages/"):
        VOC12(tmp_path / "notvoc").check()
    with pytest.raises(UserError):
        ClassificationDataset(VOC12(tmp_path / "notvoc"), [], {})


def test_read_image_modes_and_errors(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (6, 5, 3), dtype=np.uint8)
    files = {"L": "L.jpg", "CMYK": "CMYK.jpg", "RGBA": "RGBA.png", "P": "P.png"}
    for mode, f in files.items():
        Image.fromarray(rgb).convert(mode).save(tmp_path / f)
    for f in files.values():
        out = read_image(tmp_path / f)
        assert out.dtype == np.uint8 and out.shape == (6, 5, 3), f
    with pytest.raises(UserError, match="nothere.jpg is missing"):
        read_image(tmp_path / "nothere.jpg")
    (tmp_path / "garbage.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match="garbage.jpg is unreadable"):
        read_image(tmp_path / "garbage.jpg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated.jpg"):
        read_image(tmp_path / "truncated.jpg")


# ---------------------------------------------------------------------------------------------------- datasets


def _labels() -> dict[str, np.ndarray]:
    return {n: np.eye(20, dtype=np.float32)[i] for i, n in enumerate("abc")}


def test_classification_dataset_train(voc_root: Path) -> None:
    ds = ClassificationDataset(VOC12(voc_root), ["a", "b", "c"], _labels(), resize_long=(20, 30), crop_size=32)
    item = ds[0]
    assert item["name"] == "a" and item["img"].shape == (3, 32, 32) and item["img"].dtype == torch.float32
    assert item["label"].dtype == torch.float32 and item["label"][0] == 1
    # Long side <= 30 < 32: the crop pads, and the pad is exactly 0 (normalised mean colour).
    assert (item["img"] == 0).all(0).any()
    # Same epoch -> same sample; another epoch -> another augmentation.
    torch.testing.assert_close(ds[1]["img"], ds[1]["img"])
    first = [ds[i]["img"] for i in range(3)]
    ds.set_epoch(1)
    assert any(not torch.equal(f, ds[i]["img"]) for i, f in enumerate(first))
    ds.set_epoch(0)
    for i, f in enumerate(first):
        torch.testing.assert_close(ds[i]["img"], f)
    # The transform is reusable on any uint8 image with a caller's generator.
    out = ds.transform(np.zeros((10, 12, 3), np.uint8), np.random.default_rng(0))
    assert out.shape == (3, 32, 32) and out.dtype == np.float32


def test_classification_dataset_val_transform(voc_root: Path) -> None:
    ds = ClassificationDataset(VOC12(voc_root), ["a"], _labels(), crop_size=64, augment=False)
    img = ds[0]["img"].numpy()
    raw = read_image(VOC12(voc_root).image("a"))
    np.testing.assert_allclose(img[:, :40, :60], imutils.hwc_to_chw(imutils.normalize(raw)), rtol=1e-6)
    assert not img[:, 40:].any() and not img[:, :, 60:].any()


def test_classification_dataset_missing_label(voc_root: Path) -> None:
    with pytest.raises(UserError, match="make_cls_labels"):
        ClassificationDataset(VOC12(voc_root), ["a", "b"], {"a": np.zeros(20, np.float32)})


def test_loader_workers_do_not_change_samples(voc_root: Path) -> None:
    ds = ClassificationDataset(VOC12(voc_root), ["a", "b", "c"] * 2, _labels(), resize_long=(20, 40), crop_size=24)

    def run(workers: int) -> torch.Tensor:
        ds.set_epoch(3)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers)
        return torch.cat([b["img"] for b in loader])

    torch.testing.assert_close(run(0), run(2))


def test_image_dataset(voc_root: Path) -> None:
    ds = ImageDataset(VOC12(voc_root), ["a", "b"], _labels())
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=single_collate)
    items = list(loader)
    assert items[0]["name"] == "a" and isinstance(items[0]["img"], np.ndarray)
    assert items[0]["img"].shape == (40, 60, 3) and items[0]["img"].dtype == np.uint8
    assert items[1]["label"][1] == 1
    assert "label" not in ImageDataset(VOC12(voc_root), ["a"])[0]


@pytest.mark.parametrize("seed", range(4))
def test_segmentation_dataset_alignment_and_pads(voc_root: Path, tmp_path: Path, seed: int) -> None:
    ds = SegmentationDataset(VOC12(voc_root), ["a"], tmp_path / "labels", crop_size=48, scale_range=(0.7, 1.3),
                             seed=seed)
    item = ds[0]
    img, label = item["img"].numpy(), item["label"].numpy()
    assert img.shape == (3, 48, 48) and label.shape == (48, 48) and label.dtype == np.int64
    # Padding: exactly where the label is 255, the image is 0 (normalisation ran before the crop).
    pad = label == 255
    np.testing.assert_array_equal(pad, (img == 0).all(0))
    # Alignment: each quadrant's label sits on its own colour (checked away from the blurred edges).
    quadrants, _ = _block_image(2, 2)
    colours = imutils.normalize(quadrants).reshape(4, 3)
    for v in range(1, 5):
        m = label == v
        core = m & np.roll(m, 2, 0) & np.roll(m, -2, 0) & np.roll(m, 2, 1) & np.roll(m, -2, 1)
        if core.any():
            np.testing.assert_allclose(np.median(img[:, core], axis=1), colours[v - 1], atol=0.15)


def test_segmentation_dataset_label_scale_and_eval(voc_root: Path, tmp_path: Path) -> None:
    ds = SegmentationDataset(VOC12(voc_root), ["a"], tmp_path / "labels", crop_size=64, label_scale=0.25)
    assert ds[0]["label"].shape == (16, 16)
    ev = SegmentationDataset(VOC12(voc_root), ["a"], tmp_path / "labels", crop_size=64, augment=False)
    label = ev[0]["label"].numpy()
    np.testing.assert_array_equal(label[:40, :60], _block_image(40, 60)[1])
    assert (label[40:] == 255).all() and (label[:, 60:] == 255).all()


def test_segmentation_dataset_errors(voc_root: Path, tmp_path: Path) -> None:
    save_png(tmp_path / "wrong" / "a.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(UserError, match="different dataset"):
        SegmentationDataset(VOC12(voc_root), ["a"], tmp_path / "wrong", crop_size=16)[0]
    with pytest.raises(UserError, match="missing"):
        SegmentationDataset(VOC12(voc_root), ["b"], tmp_path / "labels", crop_size=16)[0]
