"""DeepLab heads, poly schedule, exact resume, evaluation and the VOC submission layout.

The training/evaluation tests run the real steps on a tiny synthetic VOC tree; only the feature extractor
is swapped for a four-conv backbone honouring the backbone contract, so that they take seconds on a CPU.
The heads are checked on the real ResNet-50.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import misc.train
import net.deeplab
from dataset.voc12 import VOC12
from methods.deeplab import DeepLabSegmenter
from misc.checkpoint import load_checkpoint, read_checkpoint_file, save_checkpoint
from misc.errors import UserError
from misc.io import read_metrics
from misc.labels import ignore_uncertain_background
from misc.optim import PolyOptimizer
from net.backbone import Backbone, FixedBatchNorm2d
from net.deeplab import DeepLab, build_deeplab
from net.resnet import ResNet
from step import eval_deeplab, eval_sem_seg, train_deeplab

H, W = 40, 48  # synthetic image size


# ----------------------------------------------------------------------------------------- fixtures


class TinyBackbone(Backbone):
    """Five small conv levels with the ResNet strides of a dilated DeepLab backbone."""

    name = "tiny"

    def __init__(self, output_stride: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                                 FixedBatchNorm2d(cout), nn.ReLU())

        s4 = 2 if output_stride == 16 else 1
        self.levels = nn.ModuleList([
            nn.Sequential(block(3, 8, 2), block(8, 8, 2)),
            block(8, 16),
            block(16, 16, 2),
            block(16, 32, s4, dilation=3 - s4),
            block(32, 32, dilation=2 if output_stride == 16 else 4),
        ])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # as ResNet: keeps activations from shrinking level by level
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.channels = (8, 16, 16, 32, 32)
        self.strides = (4, 4, 8, output_stride, output_stride)

    def level_modules(self) -> list[list[nn.Module]]:
        return [[level] for level in self.levels]


@pytest.fixture
def tiny_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``build_deeplab`` (hence the steps) use ``TinyBackbone`` instead of a real network."""
    monkeypatch.setattr(net.deeplab, "build_backbone",
                        lambda name, weights, *, dilate, output_stride: TinyBackbone(output_stride))


def make_voc(root: Path, n_train: int = 8, n_val: int = 4, n_test: int = 2, seed: int = 0) -> None:
    """VOC layout with a red rectangle (class 1) on a noisy blue background; lists in ImageSets."""
    rng = np.random.default_rng(seed)
    ids = [f"2000_{i:06d}" for i in range(n_train + n_val + n_test)]
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in ids:
        img = np.clip(np.array([40, 90, 200]) + rng.normal(0, 10, (H, W, 3)), 0, 255).astype(np.uint8)
        mask = np.zeros((H, W), np.uint8)
        y0, x0 = rng.integers(2, H // 2), rng.integers(2, W // 2)
        y1, x1 = y0 + rng.integers(10, H // 2), x0 + rng.integers(10, W // 2)
        img[y0:y1, x0:x1] = (220, 40, 30)
        mask[y0:y1, x0:x1] = 1
        Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
        Image.fromarray(mask).save(root / "SegmentationClass" / f"{i}.png")
    splits = {"train": ids[:n_train], "val": ids[n_train : n_train + n_val], "test": ids[n_train + n_val :]}
    for split, split_ids in splits.items():
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(split_ids) + "\n")


def make_args(tmp: Path, **overrides: object) -> argparse.Namespace:
    """The fields the DeepLab steps read, with tiny settings (the driver's make_args will supply them)."""
    root = tmp / "voc"
    if not root.exists():
        make_voc(root)
    lists = root / "ImageSets/Segmentation"
    fields = dict(
        work_dir=str(tmp / "work"), dataset="voc12", data_root=str(root), device="cpu", num_workers=0, seed=0,
        amp=False, train_list=str(lists / "train.txt"), val_list=str(lists / "val.txt"),
        test_list=str(lists / "test.txt"), variant="baseline", segmenter="deeplab",
        sem_seg_out_dir=str(tmp / "work/baseline/sem_seg"), deeplab_ignore_uncertain=False,
        sem_seg_ignore_dir=str(tmp / "work/baseline/sem_seg_ignore"), deeplab_dir=str(tmp / "work/baseline/deeplab"),
        deeplab_train_list=str(lists / "train.txt"), deeplab_gt=True, deeplab_arch="v2", deeplab_backbone="resnet50",
        deeplab_weights="none", deeplab_output_stride=16, deeplab_crop_size=32, deeplab_batch_size=4,
        deeplab_iters=30, deeplab_learning_rate=0.01, deeplab_weight_decay=5e-4, deeplab_ckpt_every=1000,
        deeplab_eval_scales=[0.75, 1.0, 1.25], deeplab_crf=False, make_test_submission=False, max_image_side=None,
    )
    fields.update(overrides)
    return argparse.Namespace(**fields)


# ------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("arch", ["v2", "v3+"])
def test_heads_on_resnet50(arch: str, output_stride: int) -> None:
    torch.manual_seed(0)
    model = DeepLab(ResNet(50, dilate=True, output_stride=output_stride), arch, 21).eval()
    head_shapes = []
    model.head.register_forward_hook(lambda module, inputs, out: head_shapes.append(tuple(out.shape)))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 65, 97)).shape == (2, 21, 65, 97)
    # v2 classifies the last level (ceil(65/OS) x ceil(97/OS)); v3+ decodes at the stride-4 level.
    expected = (-(-65 // output_stride), -(-97 // output_stride)) if arch == "v2" else (17, 25)
    assert head_shapes == [(2, 21, *expected)]
    backbone, head = model.param_groups()
    assert len(backbone) + len(head) == len(list(model.parameters()))
    assert {id(p) for p in backbone}.isdisjoint(id(p) for p in head)
    assert all(isinstance(m, FixedBatchNorm2d) for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    if arch == "v3+":
        rates = [m.dilation[0] for m in model.head.aspp.branches.modules() if isinstance(m, nn.Conv2d)]
        assert rates == [1] + [r * 16 // output_stride for r in (6, 12, 18)]
        assert any(type(m) is nn.BatchNorm2d for m in model.head.modules())


def test_v3plus_initial_loss_is_that_of_a_uniform_guess() -> None:
    # Small initial logits: the first loss is ~ln(21), not the ~7 a Kaiming-initialised classifier gave.
    # (The head's BatchNorm makes this independent of the random backbone's feature scale; v2 has no
    # BatchNorm in its head, its classifier is N(0, 0.01) by DeepLab-v2's design.)
    torch.manual_seed(0)
    model = DeepLab(ResNet(50, dilate=True, output_stride=16), "v3+", 21).train()
    target = torch.randint(0, 21, (2, 64, 64))
    with torch.no_grad():
        loss = DeepLabSegmenter().loss(model(torch.randn(2, 3, 64, 64)), target)
    assert abs(float(loss) - math.log(21)) < 0.1


def test_unknown_arch_is_a_user_error(tiny_backbone: None) -> None:
    with pytest.raises(UserError, match="arch"):
        build_deeplab("v4", "resnet50", None, 16, num_classes=21)


def test_poly_schedule_values() -> None:
    param = nn.Parameter(torch.zeros(1))
    head = nn.Parameter(torch.zeros(1))
    opt = PolyOptimizer([{"params": [param], "lr": 2.5e-4}, {"params": [head], "lr": 2.5e-3}],
                        lr=2.5e-4, weight_decay=5e-4, max_step=10, momentum=0.9)
    used = []
    for _ in range(13):
        opt.step()
        used.append([g["lr"] for g in opt.param_groups])
    # lr_t = lr0 * (1 - t/T)^0.9 with T = 10: 0.5^0.9 = 0.5358867313, 0.1^0.9 = 0.1258925412
    assert used[0] == pytest.approx([2.5e-4, 2.5e-3], rel=1e-12)
    assert used[5] == pytest.approx([2.5e-4 * 0.5358867313, 2.5e-3 * 0.5358867313], rel=1e-9)
    assert used[9] == pytest.approx([2.5e-4 * 0.1258925412, 2.5e-3 * 0.1258925412], rel=1e-9)
    assert used[10] == used[11] == used[12] == used[9]  # frozen after T
    assert opt.param_groups[0]["momentum"] == 0.9


# -------------------------------------------------------------------------------------- checkpoint


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    # A wrapper's ``module.`` prefix must not reach the file.
    save_checkpoint(tmp_path / "c.pth", model=nn.DataParallel(model), optimizer=opt, iteration=7, extra={"lr": 0.1})
    expected = (random.random(), np.random.rand(), torch.rand(1))

    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    # Tensors and plain values only: it loads without unpickling objects (weights_only).
    ckpt = read_checkpoint_file(tmp_path / "c.pth", expect_extra={"lr": 0.1})
    assert load_checkpoint(ckpt, tmp_path / "c.pth", fresh, fresh_opt) == 7
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    momentum = [o.state_dict()["state"][0]["momentum_buffer"] for o in (opt, fresh_opt)]
    assert torch.equal(*momentum)
    with pytest.raises(UserError, match="lr=0.1"):
        read_checkpoint_file(tmp_path / "c.pth", expect_extra={"lr": 0.2})
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="text.pth is unreadable"):
        read_checkpoint_file(tmp_path / "text.pth")


# ---------------------------------------------------------------------------------------- training


def _losses(out_dir: Path) -> dict[int, float]:
    """Step -> loss of the per-step training log of ``out_dir/deeplab.pth`` (or of its run in progress)."""
    saved = out_dir / "deeplab.pth.log.jsonl"
    (path,) = [saved] if saved.is_file() else list(out_dir.glob("deeplab.*.log.jsonl"))
    lines = path.read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}


class _Interrupt(Exception):
    pass


def _die_after_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = misc.train.save_checkpoint

    def save_then_die(*args: object, **kwargs: object) -> None:
        real_save(*args, **kwargs)
        raise _Interrupt

    monkeypatch.setattr(misc.train, "save_checkpoint", save_then_die)


def resume_matches_straight(tmp_path: Path, interrupted: argparse.Namespace, reference: dict[int, float]) -> None:
    """Resume the run of ``tmp_path/resumed`` from a fresh process state (the global RNGs scrambled) and check
    that it ends with the losses and weights of the uninterrupted run in ``tmp_path/straight``."""
    torch.manual_seed(1234)
    np.random.seed(1234)
    train_deeplab.run(interrupted)
    assert _losses(tmp_path / "resumed") == reference
    a = torch.load(tmp_path / "straight/deeplab.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed/deeplab.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_gives_the_uninterrupted_loss(tmp_path: Path, tiny_backbone: None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # v3+: dropout and head BatchNorm make the RNG state and BN buffers part of what must be restored.
    common = dict(deeplab_arch="v3+", deeplab_iters=5, deeplab_batch_size=3, deeplab_crop_size=16)
    straight = make_args(tmp_path, deeplab_dir=str(tmp_path / "straight"), **common)
    train_deeplab.run(straight)
    reference = _losses(tmp_path / "straight")
    assert sorted(reference) == [1, 2, 3, 4, 5]  # 8 images // 3 = 2 steps per epoch: crosses epochs

    # Same run with a checkpoint at iteration 3, killed right after writing it.
    interrupted = make_args(tmp_path, deeplab_dir=str(tmp_path / "resumed"), deeplab_ckpt_every=3, **common)
    with monkeypatch.context() as patch:
        _die_after_checkpoint(patch)
        with pytest.raises(_Interrupt):
            train_deeplab.run(interrupted)
    assert len(list((tmp_path / "resumed").glob("deeplab.*.ckpt"))) == 1
    assert not (tmp_path / "resumed/deeplab.pth").exists()
    # The epoch end at step 2 checkpoints too; the run died at the first one.
    assert _losses(tmp_path / "resumed") == {k: reference[k] for k in (1, 2)}

    resume_matches_straight(tmp_path, interrupted, reference)
    assert not list((tmp_path / "resumed").glob("*.ckpt"))


def test_other_settings_never_resume_from_a_checkpoint(tmp_path: Path, tiny_backbone: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    args = make_args(tmp_path, deeplab_iters=3, deeplab_ckpt_every=1)
    with monkeypatch.context() as patch:
        _die_after_checkpoint(patch)
        with pytest.raises(_Interrupt):
            train_deeplab.run(args)
    (stale,) = Path(args.deeplab_dir).glob("*.ckpt")
    other = make_args(tmp_path, deeplab_iters=3, deeplab_learning_rate=0.1)
    train_deeplab.run(other)
    # Trained from step 1 (not resumed from the other run's checkpoint), whose checkpoint is gone.
    assert sorted(_losses(Path(other.deeplab_dir))) == [1, 2, 3] and not stale.exists()


def test_missing_inputs_are_user_errors(tmp_path: Path) -> None:
    args = make_args(tmp_path, deeplab_gt=False)
    with pytest.raises(UserError, match="make_sem_seg_labels with infer_list = train_list"):
        train_deeplab.run(args)
    with pytest.raises(UserError, match="run train_deeplab first"):
        eval_deeplab.run(args)


def test_training_masks_with_uncertain_background_ignored(tmp_path: Path) -> None:
    args = make_args(tmp_path, deeplab_gt=False, deeplab_ignore_uncertain=True)
    ids = [f"2000_{i:06d}" for i in range(8)]
    with pytest.raises(UserError, match=r"sem_seg_ignore .*--deeplab_ignore_uncertain true"):
        train_deeplab.label_dir(args, ids)
    for folder in (args.sem_seg_out_dir, args.sem_seg_ignore_dir):
        Path(folder).mkdir(parents=True)
        for i in ids:
            Image.fromarray(np.zeros((H, W), np.uint8)).save(Path(folder) / f"{i}.png")
    assert train_deeplab.label_dir(args, ids) == Path(args.sem_seg_ignore_dir)
    args.deeplab_ignore_uncertain = False
    assert train_deeplab.label_dir(args, ids) == Path(args.sem_seg_out_dir)


def test_ignore_uncertain_background_by_hand() -> None:
    label = np.array([[0, 0, 3], [0, 5, 0]], np.uint8)
    scores = np.array([[[0.1, 0.4, 0.9], [0.3, 0.2, 0.0]],  # class 2 (label 3)
                       [[0.2, 0.1, 0.1], [0.1, 0.8, 0.29]]], np.float32)  # class 4 (label 5)
    out = ignore_uncertain_background(label, scores, 0.3)
    # Background whose best score reaches 0.3 (0.4 and 0.3) is ignored; 0.2 and 0.29 stay background;
    # object pixels are never touched, whatever their score.
    assert out.tolist() == [[0, 255, 3], [255, 5, 0]]
    assert label.tolist() == [[0, 0, 3], [0, 5, 0]]  # the complete mask is not modified
    no_classes = ignore_uncertain_background(np.zeros((2, 2), np.uint8), np.zeros((0, 2, 2), np.float32), 0.3)
    assert no_classes.tolist() == [[0, 0], [0, 0]]


def test_labelled_pixel_scores_by_hand(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    (root / "SegmentationClass").mkdir(parents=True)
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]], np.uint8)
    mask = np.array([[0, 255, 1, 255], [1, 0, 255, 255]], np.uint8)
    Image.fromarray(gt).save(root / "SegmentationClass" / "a.png")
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    scores = eval_sem_seg.labelled_pixel_scores(VOC12(root), ["a"], tmp_path / "masks")
    # 7 valid GT pixels, 3 of them ignored by the mask (the 255 over GT 255 does not count).
    assert scores["ignored"] == pytest.approx(3 / 7)
    # Labelled pixels: bg->bg x2, bg->1 x1, 1->1 x1. IoU bg = 2/3, IoU class 1 = 1/2.
    assert scores["per_class"]["background"] == pytest.approx(100 * 2 / 3)
    assert scores["per_class"]["aeroplane"] == pytest.approx(100 / 2)
    assert scores["miou"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)


# -------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> argparse.Namespace:
    """DeepLab-v3+ trained on the synthetic ground truth, evaluated with and without CRF, test exported.

    v3+ because its stride-4 decoder resolves the rectangles of these tiny images; v2 classifies the
    2x2 stride-16 map of a 32-pixel crop and needs far more than 30 iterations to get there.
    """
    tmp = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(net.deeplab, "build_backbone", lambda name, weights, *, dilate, output_stride: TinyBackbone())
        args = make_args(tmp, deeplab_arch="v3+", make_test_submission=True, deeplab_crf=True)
        train_deeplab.run(args)
        eval_deeplab.run(args)  # one inference, both rows: raw multi-scale and CRF-refined
    return args


def test_trained_deeplab_segments_the_synthetic_set(evaluated: argparse.Namespace) -> None:
    rows = [r for r in read_metrics(evaluated.work_dir) if r["step"] == "eval_deeplab"]
    assert [r["postprocess"] for r in rows] == ["msf", "msf+crf"]
    for row in rows:
        assert row["split"] == "val" and row["variant"] == "baseline" and row["scales"] == [0.75, 1.0, 1.25]
        assert {"precision", "recall", "per_class", "mean_precision", "mean_recall"} <= row.keys()
        # Labelling everything background scores 43 mIoU on this val set, random labels ~30; 60 needs the
        # rectangles found. Measured over five initialisations of these 30 iterations: 67 (this run's), 87-95.
        assert row["miou"] > 60, row
    preds = sorted(Path(evaluated.deeplab_dir, "pred_val").glob("*.png"))
    assert len(preds) == 4 and len(list(Path(evaluated.deeplab_dir, "pred_val_crf").glob("*.png"))) == 4


def test_eval_resumes_from_existing_predictions(evaluated: argparse.Namespace, tiny_backbone: None) -> None:
    pred_dir = Path(evaluated.deeplab_dir, "pred_val")
    first = sorted(pred_dir.glob("*.png"))[0]
    np.asarray(Image.open(first))  # readable
    first.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in pred_dir.glob("*.png")}
    eval_deeplab.run(evaluated)
    assert first.is_file()
    assert {p.name: p.stat().st_mtime_ns for p in pred_dir.glob("*.png") if p.name in before} == before
    rows = [r for r in read_metrics(evaluated.work_dir) if r["step"] == "eval_deeplab" and r["postprocess"] == "msf"]
    assert rows[-1]["miou"] == rows[0]["miou"]


def test_submission_layout(evaluated: argparse.Namespace) -> None:
    root = Path(evaluated.deeplab_dir, "submission")
    test_ids = Path(evaluated.test_list).read_text().split()
    names = [f"results/VOC2012/Segmentation/comp6_test_cls/{i}.png" for i in test_ids]
    for name in names:
        with Image.open(root / name) as img:
            assert img.mode == "P" and img.size == (W, H)
            values = np.asarray(img)
            assert values.max() <= 20 and set(np.unique(values)) <= {0, 1}
            assert img.getpalette()[3:6] == [128, 0, 0]  # VOC colour of class 1
    with tarfile.open(root / "results.tgz") as tar:
        assert sorted(tar.getnames()) == sorted(names)
