"""The embedded demo dataset: determinism, VOC-layout consistency, void band and context bias."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dataset.base import read_id_list, read_image
from dataset.samples import ClassificationDataset
from dataset.voc12 import VOC12
from misc.errors import UserError
from misc.io import load_png
from voc12 import demo

SMALL = {"n_train_aug": 48, "n_train": 16, "n_val": 16}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.make_demo_dataset(tmp_path_factory.mktemp("demo") / "voc", seed=0, **SMALL)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _ids(root: Path) -> list[str]:
    layout = VOC12(root)
    return read_id_list(layout.split_list("train_aug")) + read_id_list(layout.split_list("val"))


def test_deterministic(demo_root: Path, tmp_path: Path) -> None:
    again = demo.make_demo_dataset(tmp_path / "again", seed=0, **SMALL)
    assert _all_files(again) == _all_files(demo_root)
    other = _all_files(demo.make_demo_dataset(tmp_path / "other", seed=1, **SMALL))
    reference = _all_files(demo_root)
    assert other.keys() == reference.keys()
    assert other["JPEGImages/2100_000001.jpg"] != reference["JPEGImages/2100_000001.jpg"]


def test_noop_when_complete_and_regenerated_otherwise(tmp_path: Path) -> None:
    root = demo.make_demo_dataset(tmp_path / "d", seed=0, n_train_aug=8, n_train=4, n_val=4)
    jpg = VOC12(root).image("2100_000001")
    stamp = jpg.stat().st_mtime_ns
    demo.make_demo_dataset(root, seed=0, n_train_aug=8, n_train=4, n_val=4)
    assert jpg.stat().st_mtime_ns == stamp
    manifest = json.loads((root / demo.MANIFEST).read_text())
    assert manifest["seed"] == 0 and manifest["n_train_aug"] == 8
    # Missing file -> regenerated; other parameters -> regenerated.
    jpg.unlink()
    demo.make_demo_dataset(root, seed=0, n_train_aug=8, n_train=4, n_val=4)
    assert jpg.is_file()
    demo.make_demo_dataset(root, seed=0, n_train_aug=8, n_train=4, n_val=5)
    assert len(read_id_list(VOC12(root).split_list("val"))) == 5
    assert json.loads((root / demo.MANIFEST).read_text())["n_val"] == 5


def test_layout_and_lists(demo_root: Path) -> None:
    layout = VOC12(demo_root).check()
    train_aug = read_id_list(layout.split_list("train_aug"))
    train = read_id_list(layout.split_list("train"))
    val = read_id_list(layout.split_list("val"))
    assert (len(train_aug), len(train), len(val)) == (48, 16, 16)
    assert set(train) <= set(train_aug) and not set(val) & set(train_aug)
    assert all(re.fullmatch(r"2100_\d{6}", i) for i in train_aug + val)
    sizes = set()
    for name in train_aug + val:
        img = read_image(layout.image(name))
        sizes.add(img.shape[:2])
        assert 128 <= img.shape[0] <= 192 and 128 <= img.shape[1] <= 192
        assert load_png(layout.seg_class(name)).shape == img.shape[:2] == load_png(layout.seg_object(name)).shape
    assert len(sizes) > 10  # variable sizes, like VOC


def test_masks_match_annotations(demo_root: Path) -> None:
    layout = VOC12(demo_root)
    demo_classes = {VOC12.class_names.index(c) for c in demo.DEMO_CLASSES}
    for name in _ids(demo_root):
        from_xml = layout.derive_labels(layout.annotation(name))
        np.testing.assert_array_equal(from_xml, layout.derive_labels(layout.seg_class(name)), err_msg=name)
        classes = set(np.flatnonzero(from_xml).tolist())
        assert 1 <= len(classes) <= 2 and classes <= demo_classes
        cls_map, inst = load_png(layout.seg_class(name)), load_png(layout.seg_object(name))
        instances = sorted(set(np.unique(inst).tolist()) - {0, 255})
        n_objects = len(re.findall("<object>", layout.annotation(name).read_text()))
        assert instances == list(range(1, n_objects + 1)) and 1 <= n_objects <= 3
        # Instances and classes agree pixel by pixel, and share the void band.
        np.testing.assert_array_equal(inst == 255, cls_map == 255)
        np.testing.assert_array_equal(inst == 0, cls_map == 0)
        for k in instances:
            assert len(np.unique(cls_map[inst == k])) == 1
        fg = (cls_map != 0).mean()  # objects including their void outline
        assert 0.08 <= fg <= 0.55, name


def test_void_band_separates_objects_from_background(demo_root: Path) -> None:
    layout = VOC12(demo_root)
    near_counts = []
    for name in _ids(demo_root)[:12]:
        cls_map = load_png(layout.seg_class(name))
        void = cls_map == 255
        assert void.any()
        # No object pixel touches a background pixel (4-neighbourhood) without void in between.
        obj, bg = (cls_map > 0) & ~void, cls_map == 0
        assert not (ndimage.binary_dilation(obj) & bg).any()
        # The band is thin (about 2 px): nearly every void pixel touches a non-void one. Exceptions are tips
        # and thin parts such as a tail or a mast, void through their whole width as in VOC; in one small
        # image they can reach ~20 % of the void, so the strict bound holds over the images together.
        near = ndimage.distance_transform_edt(void)[void] <= 1.5
        assert near.mean() > 0.75, name
        near_counts.append((near.sum(), near.size))
        assert void.mean() < 0.1
    near_total, void_total = np.sum(near_counts, axis=0)
    assert near_total / void_total > 0.9


def test_context_bias_plan() -> None:
    """Exactly round(p * n_c) images of each primary class get its typical background; partners always do."""
    plan = demo._plan(800, 0.85, np.random.default_rng(0))
    for c, cls in enumerate(demo.DEMO_CLASSES):
        rows = [(bg, second) for primary, bg, second in plan if primary == c]
        assert len(rows) == 100
        assert sum(bg == demo.TYPICAL_BACKGROUND[cls] for bg, _ in rows) == 85
    seconds = [(bg, second) for _, bg, second in plan if second is not None]
    assert 0.15 < len(seconds) / len(plan) < 0.4
    assert all(demo.TYPICAL_BACKGROUND[demo.DEMO_CLASSES[s]] == bg for bg, s in seconds)


def test_context_bias_statistic(demo_root: Path) -> None:
    # 6 train_aug images per primary class: round(0.85 * 6) = 5 on the typical background, plus any
    # second-class appearances, which are always in context.
    bias = demo.context_bias(demo_root, "train_aug")
    assert set(bias) == set(demo.DEMO_CLASSES)
    assert all(5 / 6 - 1e-9 <= f <= 1.0 for f in bias.values()), bias
    assert np.mean(list(bias.values())) <= 0.95
    backgrounds = [line.split("\t")[1] for line in (demo_root / demo.CONTEXT_FILE).read_text().splitlines()]
    assert set(backgrounds) == set(demo.BACKGROUNDS)


def test_errors(demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        ClassificationDataset(VOC12(tmp_path / "missing"), ["2100_000001"], {})
    # A corrupt JPEG is named in the error.
    root = demo.make_demo_dataset(tmp_path / "d", seed=0, n_train_aug=4, n_train=2, n_val=2)
    VOC12(root).image("2100_000002").write_bytes(b"\xff\xd8\xff garbage")
    ds = ClassificationDataset(VOC12(root), ["2100_000002"], {"2100_000002": np.zeros(20, np.float32)}, crop_size=64)
    with pytest.raises(UserError, match="2100_000002.jpg is unreadable"):
        ds[0]
    # Never write into a real dataset.
    (tmp_path / "real" / "JPEGImages").mkdir(parents=True)
    (tmp_path / "real" / "JPEGImages" / "2007_000032.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="not the demo"):
        demo.make_demo_dataset(tmp_path / "real", n_train_aug=4, n_train=2, n_val=2)
    with pytest.raises(UserError, match="n_train"):
        demo.make_demo_dataset(tmp_path / "x", n_train_aug=4, n_train=5, n_val=2)
