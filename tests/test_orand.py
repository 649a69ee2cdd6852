"""ORANDNet (orandnet spec 5-9): OR / AND stores, the FCN-8s, its loss and training, ORAND CAMs, the converter,
the precision-aware threshold, the DeepLab scale curriculum, and the method end to end on the tiny run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import net.deeplab
import run_sample
from dataset.samples import SegmentationDataset
from dataset.voc12 import VOC12
from methods.orand import fcn_per_class, orand_cam, orand_loss
from misc.cam_store import combine_image, combine_stores, convert_store, downsample, or_and, store_fingerprint
from misc.curriculum import ScaleSchedule, ScheduledScale, parse_scale_schedule
from misc.errors import UserError
from misc.io import load_cam, save_cam
from misc.metrics import choose_threshold
from misc.pipeline import MANIFEST, epoch_loader
from misc.train import TrainData
from net.orandnet import FCN8s, center_crop
from step import train_deeplab
from tests.test_deeplab import (
    TinyBackbone,
    _die_after_checkpoint,
    _Interrupt,
    _losses,
    make_args,
    make_voc,
    resume_matches_straight,
)

# ------------------------------------------------------------------------------------------ OR / AND


def test_or_and_bounds_and_identities():
    rng = np.random.default_rng(0)
    r, v = rng.random((2, 5, 7)), rng.random((2, 5, 7)) * 0.85
    for offset in (0.0, 0.15):
        o, a = or_and(r, v, offset)
        vv = v + offset
        assert (o >= np.maximum(r, vv) - 1e-12).all() and (a <= np.minimum(r, vv) + 1e-12).all()
        assert (o >= a).all()
    # Neutral elements: OR with 0 and AND with 1 leave a map unchanged (offset 0).
    assert np.allclose(or_and(r, np.zeros_like(r))[0], r) and np.allclose(or_and(r, np.ones_like(r))[1], r)
    # Idempotent on binary maps; symmetric in the two stores without an offset.
    b = (r > 0.5).astype(np.float64)
    assert np.array_equal(or_and(b, b)[0], b) and np.array_equal(or_and(b, b)[1], b)
    assert np.allclose(or_and(r, v)[0], or_and(v, r)[0]) and np.allclose(or_and(r, v)[1], or_and(v, r)[1])
    # Not clipped: with the ViT offset, OR reaches 1.15 (r = 0, v = 1) and AND too (r = v = 1).
    assert np.isclose(or_and(np.zeros(1), np.ones(1), 0.15)[0][0], 1.15)
    assert np.isclose(or_and(np.ones(1), np.ones(1), 0.15)[1][0], 1.15)


def _store(root: Path, name: str, keys: list[int], maps: np.ndarray) -> Path:
    save_cam(root / f"{name}.npz", np.array(keys), downsample(maps), maps)
    return root / f"{name}.npz"


def test_combine_takes_the_label_classes_in_order_and_names_files_that_do_not_fit(tmp_path: Path):
    rng = np.random.default_rng(1)
    a_maps, b_maps = rng.random((3, 9, 11)).astype(np.float32), rng.random((2, 9, 11)).astype(np.float32)
    a = _store(tmp_path / "a", "img", [1, 4, 7], a_maps)  # store A holds an extra class (4)
    b = _store(tmp_path / "b", "img", [1, 7], b_maps)
    keys, o, n = combine_image(a, b, np.array([1, 7]))
    assert keys.tolist() == [1, 7] and o["high_res"].shape == (2, 9, 11) and o["cam"].shape == (2, 3, 3)
    expect_or, expect_and = or_and(a_maps[[0, 2]], b_maps)
    assert np.allclose(o["high_res"], expect_or, atol=2e-3) and np.allclose(n["high_res"], expect_and, atol=2e-3)
    # A class of the label that a store lacks: the error names the file and the class.
    with pytest.raises(UserError, match=r"b/img\.npz has no map of class \[4\]"):
        combine_image(a, b, np.array([1, 4]))
    # Without labels the stores must agree on the classes; the error names both files.
    with pytest.raises(UserError, match=r"a/img\.npz holds classes \[1, 4, 7\] but .*b/img\.npz holds \[1, 7\]"):
        combine_image(a, b)
    # An image missing from one store.
    _store(tmp_path / "a", "other", [1], a_maps[:1])
    labels = {"img": np.eye(8, dtype=np.float32)[[1, 7]].sum(0), "other": np.eye(8, dtype=np.float32)[1]}
    with pytest.raises(UserError, match=r"b/other\.npz is missing"):
        combine_stores(tmp_path / "a", tmp_path / "b", ["img", "other"], tmp_path / "or", tmp_path / "and",
                       labels=labels)
    # Different image sizes.
    _store(tmp_path / "b", "small", [1], b_maps[:1, :5])
    _store(tmp_path / "a", "small", [1], a_maps[:1])
    with pytest.raises(UserError, match="differ in"):
        combine_image(tmp_path / "a/small.npz", tmp_path / "b/small.npz")


def test_combined_stores_are_standard_cam_files(tmp_path: Path):
    maps = np.random.default_rng(2).random((2, 6, 10)).astype(np.float32)
    _store(tmp_path / "a", "x", [0, 3], maps)
    _store(tmp_path / "b", "x", [0, 3], maps[::-1].copy())
    labels = {"x": np.array([1, 0, 0, 1], np.float32)}
    assert combine_stores(tmp_path / "a", tmp_path / "b", ["x"], tmp_path / "or", tmp_path / "and", 0.15, labels) == 1
    for store in ("or", "and"):
        cams = load_cam(tmp_path / store / "x.npz")
        assert cams["keys"].tolist() == [0, 3]
        assert cams["cam"].shape == (2, 2, 3) and cams["high_res"].shape == (2, 6, 10)


def test_a_store_without_manifest_is_identified_by_its_files(tmp_path: Path):
    maps = np.random.default_rng(3).random((1, 6, 10)).astype(np.float32)
    _store(tmp_path / "a", "x", [0], maps)
    first = store_fingerprint(tmp_path / "a")
    assert store_fingerprint(tmp_path / "a") == first
    _store(tmp_path / "a", "y", [0], maps)  # a new file: a different store
    second = store_fingerprint(tmp_path / "a")
    assert second != first
    (tmp_path / "a" / MANIFEST).write_text('{"fingerprint": "abc"}')  # a pipeline step's store: its producer
    assert store_fingerprint(tmp_path / "a") == '{"fingerprint": "abc"}'
    with pytest.raises(UserError, match="no CAM file"):
        store_fingerprint(tmp_path / "empty")


def test_converter_reads_reference_pickles_only_when_asked(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    high = np.random.default_rng(3).random((3, 8, 8)).astype(np.float32)
    np.save(src / "a_1.npy", {"keys": np.array([2, 5]), "high_res": high[:2]})  # IRN dict, no stride-4 map
    np.save(src / "b_1.npy", {"keys": np.array([0, 3, 6]), "high_res": high})  # AMN-like: background first
    convert_store(src, tmp_path / "irn", "irn", "_1.npy")
    cams = load_cam(tmp_path / "irn" / "a.npz")
    assert cams["keys"].tolist() == [2, 5] and cams["cam"].shape == (2, 2, 2)
    convert_store(src, tmp_path / "amn", "amn", "_1.npy")
    cams = load_cam(tmp_path / "amn" / "b.npz")
    assert cams["keys"].tolist() == [2, 5] and np.allclose(cams["high_res"], high[1:], atol=1e-3)
    np.save(src / "c.npy", {7: high[0], 2: high[1]})
    convert_store(src, tmp_path / "mct", "mctformer", "c.npy")  # a single file, id ""
    cams = load_cam(tmp_path / "mct" / ".npz")
    assert cams["keys"].tolist() == [2, 7] and np.allclose(cams["high_res"][0], high[1], atol=1e-3)
    # What the pipeline reads stays pickle-free: a pickled record under a CAM file name is refused.
    shutil.copy(src / "a_1.npy", tmp_path / "irn" / "p.npz")
    with pytest.raises(UserError, match="unreadable"):
        load_cam(tmp_path / "irn" / "p.npz")


# ------------------------------------------------------------------------------------------- the FCN


@pytest.mark.parametrize("size", [(37, 53), (53, 37), (1, 1), (5, 120), (64, 64), (101, 99)])
def test_fcn_output_has_exactly_the_input_size(size: tuple[int, int]):
    torch.manual_seed(0)
    net = FCN8s(width=0.0625).eval()
    assert net(torch.rand(2, 1, *size)).shape == (2, 1, *size)


def test_decoder_crops_are_centred_per_dimension():
    x = torch.arange(9 * 12.0).view(1, 1, 9, 12)
    crop = center_crop(x, 3, 4)  # offsets (9 - 3) // 2 = 3 rows and (12 - 4) // 2 = 4 columns (not the rows')
    assert torch.equal(crop, x[..., 3:6, 4:8])
    with pytest.raises(ValueError):
        center_crop(x, 10, 4)


def test_fcn_response_to_a_centred_blob_is_centred():
    # A soft check (spec 13.2): centre crops do not align the decoder's maps exactly (the fixed offsets of the
    # original FCN-8s would), but the response's centre of mass, over a few random networks, stays near the blob.
    response = torch.zeros(41, 57)
    x = torch.zeros(1, 1, 41, 57)
    x[..., 18:23, 26:31] = 1.0
    for seed in range(5):
        torch.manual_seed(seed)
        net = FCN8s(width=0.0625).eval()
        with torch.no_grad():
            response += (net(x) - net(torch.zeros_like(x)))[0, 0].abs()
    yy, xx = torch.meshgrid(torch.arange(41.0), torch.arange(57.0), indexing="ij")
    centre = ((response * yy).sum() / response.sum(), (response * xx).sum() / response.sum())
    assert abs(centre[0] - 20) < 3 and abs(centre[1] - 28) < 3, centre


def test_vgg16_weights_fill_conv1_2_to_fc7():
    net = FCN8s()
    state = {}
    for conv, index in zip(net.convs, (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), strict=True):
        state[f"features.{index}.weight"] = torch.full((conv.out_channels, 3 if index == 0 else conv.in_channels,
                                                        3, 3), float(index))
        state[f"features.{index}.bias"] = torch.zeros(conv.out_channels)
    state["classifier.0.weight"] = torch.ones(4096, 512 * 49)
    state["classifier.0.bias"] = torch.zeros(4096)
    state["classifier.3.weight"] = torch.full((4096, 4096), 3.0)
    state["classifier.3.bias"] = torch.zeros(4096)
    net.load_vgg16(state)
    assert (net.convs[1].weight == 2).all() and (net.convs[12].weight == 28).all()
    assert net.convs[0].weight.shape == (64, 1, 3, 3) and not (net.convs[0].weight == 0).all()
    assert (net.fc6.weight == 1).all() and net.fc6.weight.shape == (4096, 512, 7, 7) and (net.fc7.weight == 3).all()
    with pytest.raises(ValueError, match="width"):
        FCN8s(width=0.5).load_vgg16(state)


def test_softmax_ce_is_zero_for_one_class_and_positive_for_two():
    net = FCN8s(width=0.0625)
    maps = torch.rand(1, 12, 14)
    loss = orand_loss(fcn_per_class(net, maps), maps * 0.5)
    loss.backward()
    assert loss.item() == 0 and all(p.grad is None or not p.grad.any() for p in net.parameters())
    two = torch.rand(2, 12, 14)
    assert orand_loss(fcn_per_class(net, two), two * 0.5).item() > 0
    assert orand_loss(fcn_per_class(net, two), two * 0.5, "bce").item() > 0
    empty = orand_loss(fcn_per_class(net, torch.zeros(0, 12, 14)), torch.zeros(0, 12, 14), "bce")
    assert empty.item() == 0 and empty.requires_grad


@pytest.mark.parametrize("kind", ["softmax_ce", "bce"])
def test_training_steps_lower_the_loss_on_a_fixed_image(kind: str):
    torch.manual_seed(0)
    net = FCN8s(width=0.0625)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 24), torch.linspace(0, 1, 30), indexing="ij")
    or_maps = torch.stack([xx, 1 - xx])
    and_maps = torch.stack([xx**3, (1 - xx) ** 3])
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        return orand_loss(fcn_per_class(net, or_maps), and_maps, kind)

    net.eval()
    with torch.no_grad():
        before = loss().item()
    net.train()
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.95 * before, (before, after)


def test_orand_cams_are_non_negative_max_normalised_in_key_order():
    torch.manual_seed(0)
    net = FCN8s(width=0.0625).eval()
    with torch.no_grad():  # a positive output bias, so no map is all zero after the ReLU
        net.up8.weight.abs_()
        net.score_final.bias.fill_(1.0)
    or_maps = torch.rand(3, 17, 23)
    or_maps[1] *= 5  # class order must survive: a map's own scale is divided out per class
    cam, high = orand_cam(net, or_maps)
    assert cam.shape == (3, 5, 6) and high.shape == (3, 17, 23)
    assert (high >= 0).all() and (cam >= 0).all()
    assert torch.allclose(high.flatten(1).amax(1), torch.ones(3), atol=1e-4)
    per_class = torch.stack([orand_cam(net, or_maps[i : i + 1])[1][0] for i in range(3)])
    assert torch.allclose(per_class, high, atol=1e-5)
    assert orand_cam(net, torch.zeros(0, 17, 23))[1].shape == (0, 17, 23)


def test_an_fcn_trained_with_bce_is_read_through_its_sigmoid():
    """All-negative logits (what BCE against a mostly small AND teaches): a ReLU would zero every map; the
    sigmoid keeps their order, min-max normalised to [0, 1]."""
    torch.manual_seed(0)
    net = FCN8s(width=0.0625).eval()
    with torch.no_grad():
        net.score_final.bias.fill_(-5.0)
    or_maps = torch.rand(2, 17, 23)
    logits = fcn_per_class(net, or_maps)
    assert (logits < 0).all() and (orand_cam(net, or_maps)[1] == 0).all()  # relu: the reference's reading
    high = orand_cam(net, or_maps, "bce")[1]
    assert torch.allclose(high.flatten(1).amax(1), torch.ones(2), atol=1e-2)  # the +1e-5 of a small range
    assert torch.allclose(high.flatten(1).amin(1), torch.zeros(2))
    expected = torch.sigmoid(logits)
    expected = expected - expected.flatten(1).amin(1)[:, None, None]
    assert torch.allclose(high, expected / (expected.flatten(1).amax(1)[:, None, None] + 1e-5), atol=1e-5)


# --------------------------------------------------------------------------- precision-aware threshold


def test_choose_threshold_returns_the_first_where_precision_exceeds_recall():
    thresholds = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert choose_threshold(thresholds, [40, 50, 60, 70, 80], [90, 70, 60, 55, 50]) == 0.4
    assert choose_threshold(thresholds[::-1], [80, 70, 60, 50, 40], [50, 55, 60, 70, 90]) == 0.4  # any order
    assert choose_threshold(thresholds, [10, 20, None, 30, 40], [90, 80, 70, 60, 50]) is None


# ---------------------------------------------------------------------------------------- curriculum


def test_scale_schedule_phases_switch_at_iteration_boundaries():
    phases = parse_scale_schedule("0.5:1,0.75:1,1.0:1")
    assert phases == [(0.5, 1.0), (0.75, 1.0), (1.0, 1.0)] and parse_scale_schedule("0.5,1") == [(0.5, 1), (1, 1)]
    schedule = ScaleSchedule.build(phases, 9)
    assert [schedule.factor(t) for t in range(10)] == [0.5] * 3 + [0.75] * 3 + [1.0] * 4
    uneven = ScaleSchedule.build([(0.5, 0.25), (1.0, 0.75)], 10)
    assert [uneven.factor(t) for t in (0, 1, 2, 3)] == [0.5, 0.5, 1.0, 1.0]  # the bound round(2.5) = 2
    assert parse_scale_schedule("none") is None and parse_scale_schedule(None) is None
    for bad in ("0.5:x", "0:1", "1:-1"):
        with pytest.raises(ValueError):
            parse_scale_schedule(bad)


def _curriculum_data(tmp_path: Path) -> TrainData:
    make_voc(tmp_path / "voc")
    info = VOC12(tmp_path / "voc")
    ids = [line for line in (tmp_path / "voc/ImageSets/Segmentation/train.txt").read_text().split()]
    base = SegmentationDataset(info, ids, None, crop_size=64, scale_range=(1.0, 1.0), seed=0, augment=True)
    return TrainData(ScheduledScale(base, ScaleSchedule.build([(0.5, 1), (1.0, 1)], 6)), 2, 0, 0)


def test_curriculum_scales_images_by_step_and_resumes_exactly(tmp_path: Path):
    data = _curriculum_data(tmp_path)  # 8 images, batch 2: 4 steps per epoch; phases 0-2 at 0.5, 3-5 at 1
    full = [b for epoch in (0, 1) for b in epoch_loader(data, epoch, 0, 4)]
    assert [b["scale_factor"].tolist() for b in full[:6]] == [[0.5, 0.5]] * 3 + [[1.0, 1.0]] * 3
    # At half scale a 40x48 photo fills at most 20x24 of the 64x64 crop; the rest is padding (255).
    labelled = [int((b["label"] != 255).sum(dim=(1, 2)).max()) for b in full[:6]]
    assert max(labelled[:3]) <= 20 * 24 and min(labelled[3:]) > 20 * 24
    # The masks keep their label values (nearest), no new ones.
    assert set(torch.cat([b["label"].unique() for b in full]).tolist()) <= {0, 1, 255}
    # A resume at step 5 (epoch 1, batch 1) sees exactly what the uninterrupted run saw.
    resumed = list(epoch_loader(data, 1, 1, 4))
    for a, b in zip(full[5:], resumed, strict=True):
        assert a["name"] == b["name"] and torch.equal(a["img"], b["img"]) and torch.equal(a["label"], b["label"])


def test_train_deeplab_with_a_schedule_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(net.deeplab, "build_backbone",
                        lambda name, weights, *, dilate, output_stride: TinyBackbone(output_stride))
    common = dict(deeplab_iters=5, deeplab_batch_size=3, deeplab_crop_size=16, deeplab_scale_schedule="0.5:2,1:3")
    straight = make_args(tmp_path, deeplab_dir=str(tmp_path / "straight"), **common)
    train_deeplab.run(straight)
    reference = _losses(tmp_path / "straight")
    plain = make_args(tmp_path, deeplab_dir=str(tmp_path / "plain"), **{**common, "deeplab_scale_schedule": None})
    train_deeplab.run(plain)
    assert _losses(tmp_path / "plain") != reference  # the schedule changes what is learnt
    interrupted = make_args(tmp_path, deeplab_dir=str(tmp_path / "resumed"), deeplab_ckpt_every=3, **common)
    with monkeypatch.context() as patch:
        _die_after_checkpoint(patch)
        with pytest.raises(_Interrupt):
            train_deeplab.run(interrupted)
    resume_matches_straight(tmp_path, interrupted, reference)


# ------------------------------------------------------------------------------------------ end to end


def test_bad_orand_flags_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture):
    own = tmp_path / "w" / "baseline" / "cam"
    own.mkdir(parents=True)
    for flags, named in ((["--cda", "false"], "--orand_sources"),
                         (["--orand_sources", str(tmp_path), str(tmp_path)], "--cda false"),
                         (["--cda", "false", "--orand_sources", str(tmp_path / "nope"), str(tmp_path)], "nope"),
                         (["--cda", "false", "--orand_sources", str(own), str(tmp_path)], "own CAM folder")):
        assert run_sample.main(["--cam_method", "orand", "--work_dir", str(tmp_path / "w"), *flags]) == 2
        assert named in capsys.readouterr().err


def test_orandnet_on_two_rounds_cams_runs_end_to_end(tiny_run, tmp_path: Path):
    work = tmp_path / "orand"
    shutil.copytree(tiny_run.work_dir, work)
    sources = [str(tiny_run.work_dir / variant / "cam") for variant in ("baseline", "cda")]
    flags = [*tiny_run.flags[2:], "--work_dir", str(work), "--cam_method", "orand", "--orand_sources", *sources,
             "--cda", "false", "--orandnet_iters", "150", "--orandnet_learning_rate", "0.03", "--orandnet_loss", "bce",
             "--make_ins_seg_pass", "false", "--eval_ins_seg_pass", "false", "--train_deeplab_pass", "false",
             "--eval_deeplab_pass", "false", "--report_pass", "false"]
    assert run_sample.main(flags) == 0
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    latest = {r["step"]: r for r in rows if r["variant"] == "baseline"}
    for step in ("eval_or_cam", "eval_and_cam", "eval_cam"):
        row = latest[step]
        assert row["mean_precision"] is not None and set(row["sweep_precision"]) == set(row["sweep"])
    # OR covers more and AND less: at one threshold AND is the more precise, OR the more complete.
    t = "0.30"
    assert latest["eval_and_cam"]["sweep_precision"][t] > latest["eval_or_cam"]["sweep_precision"][t]
    assert latest["eval_or_cam"]["sweep_recall"][t] > latest["eval_and_cam"]["sweep_recall"][t]
    log = [json.loads(line) for line in (work / "baseline/sess/orandnet.pth.log.jsonl").read_text().splitlines()]
    assert len(log) == 150
    cams = load_cam(work / "baseline/cam" / f"{sorted(p.stem for p in (work / 'baseline/cam').glob('*.npz'))[0]}.npz")
    assert np.allclose(cams["high_res"].reshape(len(cams["keys"]), -1).max(1), 1, atol=1e-2)
    mask = next(r for r in rows if r["step"] == "eval_sem_seg" and r["variant"] == "baseline"
                and r.get("postprocess") is None)
    assert rows.index(mask) > rows.index(latest["eval_cam"])  # IRN's masks of the ORAND CAMs, not the copy's
    # Better than labelling everything background (~8.6 mIoU on this split; checked in test_cam_stage).
    assert max(latest["eval_cam"]["sweep"].values()) > 12 and mask["miou"] > 12
