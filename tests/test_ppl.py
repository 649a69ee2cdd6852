"""PPL (methods/ppl.py, net/ppl.py): the unit tests of spec ppl.md section 11, and PPL + CDA end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import run_sample
from methods.ppl import PPL
from misc.train import TrainData, progress_log_path, train
from net.backbone import Backbone
from net.factory import build_backbone
from net.ppl import PPLNet, merge_patches, split_patches
from step.make_cam import multiscale_cam


class ConvStack(Backbone):
    """Five levels of one 3x3 conv (+ ReLU) each, stride 1 except level ``strided`` (stride 2)."""

    name = "conv_stack"

    def __init__(self, width: int = 4, strided: int | None = None) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(3 if i == 0 else width, width, 3, stride=2 if i == strided else 1, padding=1) for i in range(5))
        self.channels = (width,) * 5
        self.strides = tuple(2 if strided is not None and i >= strided else 1 for i in range(5))

    def level_modules(self) -> list[list[nn.Module]]:
        return [[conv, nn.ReLU()] for conv in self.convs]


@pytest.mark.parametrize("grid", [1, 2, 3, 4])
@pytest.mark.parametrize("multiple", [1, 4])
def test_merge_inverts_split_including_padding(grid: int, multiple: int):
    f = torch.randn(2, 5, 7, 9)
    patches = split_patches(f, grid, multiple)
    step = grid * multiple
    padded = (-(-7 // step) * step, -(-9 // step) * step)
    assert patches.shape == (2 * grid * grid, 5, padded[0] // grid, padded[1] // grid)
    assert torch.equal(merge_patches(patches, grid, (7, 9)), f)


def test_split_orders_patches_row_major_per_image():
    f = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    patches = split_patches(f, 2)
    assert torch.equal(patches[1, 0], f[0, 0, :2, 2:])  # image 0, grid row 0, column 1
    assert torch.equal(patches[6, 0], f[1, 0, 2:, :2])  # image 1, grid row 1, column 0


def test_grid_one_patch_path_equals_the_global_path():
    torch.manual_seed(0)
    net = PPLNet(build_backbone("efficientnet_lite0", "imagenet"), 3, grid=1).eval()
    x = torch.randn(1, 3, 64, 96)  # divisible by the stride: no padding, so no border effect
    with torch.no_grad():
        global_map, patch_map = net.branch_features(x)
        cam = net.cam(x)
    assert global_map.abs().mean() > 0.1
    assert torch.allclose(global_map, patch_map, atol=1e-5)
    c = global_map.shape[1]
    w = net.classifier.weight[:, :c] + net.classifier.weight[:, c:]
    assert torch.allclose(cam, F.relu(F.conv2d(global_map, w)), atol=1e-4)


@pytest.mark.parametrize("strided", [None, 2])
def test_patch_path_is_local_and_the_global_path_is_not(strided: int | None):
    torch.manual_seed(0)
    net = PPLNet(ConvStack(strided=strided), 2, grid=2, patch_levels=(1,), frozen_levels=0).eval()
    feature = torch.rand(1, 4, 16, 16)
    size = (16 // net.backbone.strides[-1],) * 2
    bumped = feature.clone()
    bumped[0, :, 7, 7] += 10.0  # the bottom-right pixel of patch (0, 0)
    with torch.no_grad():
        patch_change = (net.patch_path(bumped, 1, size) - net.patch_path(feature, 1, size)).abs().sum(1)[0]
        global_change = (net.backbone(bumped, 2)[-1] - net.backbone(feature, 2)[-1]).abs().sum(1)[0]
    half = size[0] // 2
    assert patch_change[:half, :half].sum() > 0
    outside = patch_change.clone()
    outside[:half, :half] = 0
    assert outside.sum() == 0
    beyond = global_change.clone()
    beyond[:half, :half] = 0
    assert beyond.sum() > 0  # the 3x3 convs carry the bump across the border on the unpatched path


def test_odd_sizes_keep_patch_and_global_maps_aligned():
    net = PPLNet(build_backbone("efficientnet_lite0"), 3, grid=3, patch_levels=(0, 1, 2, 3), variant="explicit").eval()
    with torch.no_grad():
        maps = net.branch_features(torch.randn(1, 3, 97, 131))
    assert all(m.shape == maps[0].shape == (1, 1280, 7, 9) for m in maps)


def _grads(net: PPLNet, out: torch.Tensor) -> list[bool]:
    net.zero_grad(set_to_none=True)
    out.sum().backward()
    return [any(p.grad is not None and p.grad.abs().sum() > 0 for m in level for p in m.parameters())
            for level in net.backbone.level_modules()]


def test_explicit_branches_stop_the_gradient_below_their_patch_point():
    torch.manual_seed(0)
    net = PPLNet(ConvStack(), 2, grid=2, patch_levels=(1, 2, 3), variant="explicit", frozen_levels=0)
    x = torch.randn(2, 3, 16, 16)
    global_map, *branches = net.branch_features(x)
    # Branch t reaches only the levels above its patch point; the global path trains them all.
    for level, branch in zip((1, 2, 3), branches, strict=True):
        assert _grads(net, branch) == [i > level for i in range(5)]
        global_map, *branches = net.branch_features(x)
    assert _grads(net, global_map) == [True] * 5


def test_progressive_patch_path_trains_the_lower_levels():
    torch.manual_seed(0)
    net = PPLNet(ConvStack(), 2, grid=2, patch_levels=(1, 2, 3), frozen_levels=1)
    net.set_patch_level(2)
    _, patch_map = net.branch_features(torch.randn(2, 3, 16, 16))
    assert _grads(net, patch_map) == [False, True, True, True, True]  # level 0 frozen; no detach at the cut


class _Tagged(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.imgs = torch.randn(n, 3, 16, 16, generator=g)
        self.labels = (torch.rand(n, 2, generator=g) > 0.5).float()

    def __len__(self) -> int:
        return len(self.imgs)

    def set_epoch(self, epoch: int) -> None:  # the loader's hook for per-epoch augmentation seeds
        pass

    def __getitem__(self, i: int) -> dict:
        return {"img": self.imgs[i], "label": self.labels[i]}


def _ppl_args(**overrides: object):
    args = run_sample.make_args(["--cam_method", "ppl", "--num_workers", "0", "--work_dir", "unused"])
    args.__dict__.update(overrides)
    return args


class Interrupt(Exception):
    pass


def _train(tmp: Path, levels_seen: list[int], stop_at: int | None = None) -> PPLNet:
    tmp.mkdir(exist_ok=True)
    torch.manual_seed(0)
    net = PPLNet(ConvStack(), 2, grid=2, patch_levels=(1, 2, 3), frozen_levels=0)
    method = PPL()
    args = _ppl_args(ppl_stage_epochs=[2, 1, 2], cam_learning_rate=0.01)
    stages = method.stages(args, steps_per_epoch=2, poly_length=lambda n: n)
    calls = []

    def losses(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise Interrupt
        levels_seen.append(model.patch_level)
        return method.losses(model, batch["img"], batch["label"])

    train(net, stages, TrainData(_Tagged(), 4, 0, 0), tmp / "ppl.pth", "fp", losses, ckpt_every=1)
    return net


def test_progressive_stages_move_the_patch_point_restart_the_lr_and_resume_mid_stage(tmp_path: Path):
    levels: list[int] = []
    whole = _train(tmp_path / "a", levels)
    assert levels == [1] * 4 + [2] * 2 + [3] * 4
    log = progress_log_path(tmp_path / "a" / "ppl.pth", "fp")  # train() alone leaves the log of a run in progress
    lrs = [json.loads(line)["lr"][0] for line in log.read_text().splitlines()]
    # Poly restarts at each stage and spans that stage alone: lr0 * (1 - t / T)^0.9 with T its 4, 2, 4 steps.
    expected = [0.01 * (1 - t / n) ** 0.9 for n in (4, 2, 4) for t in range(n)]
    assert lrs == pytest.approx(expected)
    assert whole.patch_level == 3

    with pytest.raises(Interrupt):
        _train(tmp_path / "b", [], stop_at=6)  # stage 2's second step
    resumed_levels: list[int] = []
    resumed = _train(tmp_path / "b", resumed_levels)
    assert resumed_levels == [2] + [3] * 4  # resumed inside stage 2, with stage 2's structure
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_ppl_cams_have_the_standard_format():
    torch.manual_seed(0)
    method = PPL()
    args = _ppl_args(backbone="efficientnet_lite0", backbone_weights="efficientnet_lite0_imagenet")
    model = method.build(args, 20).eval()
    img = torch.rand(1, 3, 75, 101)
    pairs = [torch.cat([s, s.flip(-1)]) for s in (img, F.interpolate(img, scale_factor=0.5))]
    keys = torch.tensor([3, 14])
    cam, high_res = multiscale_cam(method, model, pairs, (75, 101), keys)
    assert cam.shape == (2, 19, 26) and high_res.shape == (2, 75, 101)
    for maps in (cam, high_res):
        assert maps.min() >= 0
        assert np.allclose(maps.flatten(1).amax(1).numpy(), 1.0, atol=1e-3)


def test_bad_ppl_flags_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture):
    for flags, named in ((["--ppl_levels", "1", "4"], "--ppl_levels"), (["--ppl_grid", "0"], "--ppl_grid"),
                         (["--ppl_stage_epochs", "1", "1"], "--ppl_stage_epochs"),
                         (["--ppl_variant", "explicit", "--ppl_stage_epochs", "1", "1", "1"], "--ppl_stage_epochs")):
        assert run_sample.main(["--cam_method", "ppl", "--work_dir", str(tmp_path / "w"), *flags]) == 2
        assert named in capsys.readouterr().err
        assert not (tmp_path / "w").exists()


def test_ppl_with_cda_runs_end_to_end(tiny_run, tmp_path: Path):
    work = tmp_path / "ppl"
    rows = tiny_run.rerun(work, "--cam_method", "ppl", "--ppl_stage_epochs", "1", "1", "1")
    for variant in ("baseline", "cda"):
        log = [json.loads(line) for line in (work / variant / "sess" / "cam.pth.log.jsonl").read_text().splitlines()]
        assert len(log) == 3 * (64 // (8 if variant == "baseline" else 4))  # three stages of one epoch
        cam_row = next(r for r in rows if r["step"] == "eval_cam" and r["variant"] == variant)
        mask_row = next(r for r in rows if r["step"] == "eval_sem_seg" and r["variant"] == variant
                        and r.get("postprocess") is None)
        # Better than labelling everything background (~8.6 mIoU on this split; checked in test_cam_stage).
        assert max(cam_row["sweep"].values()) > 12 and mask_row["miou"] > 12
