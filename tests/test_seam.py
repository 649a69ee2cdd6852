"""SEAM (methods/seam.py, net/seam.py): the PCM, ER and ECR behaviours of spec seam_affinitynet 11.3 items 7-8,
the method's flags and CAMs, the paper's network on ResNet-38, and SEAM + CDA end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import net.seam
import run_sample
from methods.seam import SEAM
from misc.convert import load_weights
from net.backbone import Backbone
from net.resnet38 import ResNet38
from net.seam import (
    SEAMNet,
    max_norm,
    max_onehot,
    ohem_count,
    ohem_mean,
    pcm_affinity,
    pcm_input,
    pcm_propagate,
    seam_losses,
    siamese_input,
    upsample,
)
from step.make_cam import multiscale_cam


class Strided(Backbone):
    """Five levels of one 3x3 conv + ReLU, strides (2, 4, 8, 16, 16): levels 2 and 3 sit on other grids than
    level 4, so the PCM's resizing runs."""

    name = "strided"

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(3 if i == 0 else width, width, 3, stride=1 if i == 4 else 2, padding=1) for i in range(5))
        self.channels = (width,) * 5
        self.strides = (2, 4, 8, 16, 16)

    def level_modules(self) -> list[list[nn.Module]]:
        return [[conv, nn.ReLU()] for conv in self.convs]


def _net(num_classes: int = 3, frozen_levels: int = 0) -> SEAMNet:
    torch.manual_seed(0)
    return SEAMNet(Strided(), num_classes, frozen_levels=frozen_levels)


def _labels(n: int, c: int) -> Tensor:
    labels = torch.zeros(n, c)
    labels[:, 0] = 1
    labels[0, -1] = 1
    return labels


# ---------------------------------------------------------------------------------------------- PCM (7)


def test_pcm_output_shapes():
    net = _net(num_classes=3).eval()
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        cam, cam_rv = net(x, maps=True)
        logits = net(x)
    assert cam.shape == cam_rv.shape == (2, 4, 5, 6)  # background + 3 classes on the stride-16 grid
    assert upsample(cam_rv, (70, 90)).shape == (2, 4, 70, 90)
    assert logits.shape == (2, 3)


def test_affinity_columns_sum_to_one():
    torch.manual_seed(0)
    theta = torch.randn(2, 8, 5, 7)
    w = pcm_affinity(theta)
    assert w.shape == (2, 35, 35)
    assert torch.allclose(w.sum(1), torch.ones(2, 35), atol=1e-4)
    assert w.min() >= 0
    # Cosine similarities: scaling a pixel's embedding changes nothing.
    assert torch.allclose(pcm_affinity(theta * torch.rand(2, 1, 5, 7) * 10), w, atol=1e-5)


def test_constant_channel_comes_back_constant():
    torch.manual_seed(0)
    w = pcm_affinity(torch.randn(1, 8, 6, 6))
    cam = torch.full((1, 2, 6, 6), 0.7)
    cam[:, 1] = 0.2
    out = pcm_propagate(cam, w)
    assert torch.allclose(out, cam, atol=1e-4)


def test_non_negative_in_non_negative_out():
    torch.manual_seed(0)
    cam = torch.rand(2, 4, 6, 5)
    cam[cam < 0.5] = 0
    out = pcm_propagate(cam, pcm_affinity(torch.randn(2, 8, 6, 5)))
    assert out.min() >= 0 and out.max() <= cam.max() + 1e-6


def test_equal_embeddings_give_the_spatial_mean():
    torch.manual_seed(0)
    theta = torch.randn(1, 8, 1, 1).expand(1, 8, 4, 6)
    cam = torch.rand(1, 3, 4, 6)
    out = pcm_propagate(cam, pcm_affinity(theta))
    assert torch.allclose(out, cam.mean((2, 3), keepdim=True).expand_as(cam), atol=1e-5)


def test_pcm_input_keeps_the_top_class_and_sets_background():
    torch.manual_seed(0)
    c = pcm_input(torch.randn(2, 5, 6, 6))
    fg = c[:, 1:]
    assert ((fg > 0).sum(1) <= 1).all()
    assert torch.allclose(c[:, 0], 1 - fg.amax(1))
    assert c.min() >= 0 and fg.max() <= 1


def _grad_total(params) -> float:
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


def test_ecr_alone_trains_only_the_pcm():
    net = _net(num_classes=3)
    x, labels = torch.randn(2, 3, 64, 64), _labels(2, 3)
    terms = seam_losses(net, x, labels)
    terms["ecr"].backward()
    assert _grad_total(net.backbone.parameters()) == 0
    assert _grad_total(net.fc8.parameters()) == 0
    assert all(_grad_total(getattr(net, name).parameters()) > 0 for name in ("f8_3", "f8_4", "f9"))
    # ...while classification and ER do reach the backbone and the classifier.
    net.zero_grad(set_to_none=True)
    terms = seam_losses(net, x, labels)
    (terms["cls"] + terms["er"]).backward()
    assert _grad_total(net.backbone.parameters()) > 0 and _grad_total(net.fc8.parameters()) > 0


# ---------------------------------------------------------------------------------------- ER, ECR (8)


class Ramp(nn.Module):
    """A mock CAM network: at any input size the same positive linear ramps in normalised coordinates, on a
    grid of a quarter of the input; with ``bump_below``, inputs narrower than it (branch 2) get a bump."""

    def __init__(self, channels: int, bump_below: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.coef = torch.rand(3, channels, generator=g) + 0.1
        self.bump_below = bump_below

    def forward(self, x: Tensor, maps: bool = False) -> tuple[Tensor, Tensor]:
        h, w = x.shape[2] // 4, x.shape[3] // 4
        u = torch.linspace(0, 1, h)[:, None]
        v = torch.linspace(0, 1, w)[None, :]
        a, b, c = (k[:, None, None] for k in self.coef)
        cam = (a + b * u + c * v).expand(x.shape[0], -1, h, w).clone()
        if x.shape[3] < self.bump_below:
            cam[:, 1:, h // 2, w // 3] += 0.5
        return cam, cam.clone()


def test_er_vanishes_for_ramps_and_not_for_a_perturbed_branch():
    x, labels = torch.zeros(2, 3, 448, 448), torch.ones(2, 3)
    assert seam_losses(Ramp(4), x, labels)["er"] < 1e-6
    assert seam_losses(Ramp(4, bump_below=448), x, labels)["er"] > 1e-5  # float rounding alone gives ~5e-8


def test_a_448_crop_gives_134_pixel_maps_and_ecr_averages_75415_elements(monkeypatch: pytest.MonkeyPatch):
    assert siamese_input(torch.zeros(1, 3, 448, 448), 0.3).shape == (1, 3, 134, 134)
    k = ohem_count(21 * 134 * 134, 0.2)
    assert k == 75_415
    # The mean of the top k, pinned exactly: k ones give 1, k - 1 ones give (k - 1) / k.
    t = torch.zeros(2, 21, 134, 134)
    t.view(2, -1)[:, :k] = 1
    assert ohem_mean(t, 0.2) == 1
    t.view(2, -1)[:, k - 1] = 0
    assert ohem_mean(t, 0.2).item() == pytest.approx((k - 1) / k, abs=1e-7)
    # seam_losses hands the ECR a (B, 21, 134, 134) error map per branch for a 448 crop.
    shapes = []

    def spy(t: Tensor, ratio: float) -> Tensor:
        shapes.append((tuple(t.shape), ratio))
        return ohem_mean(t, ratio)

    monkeypatch.setattr(net.seam, "ohem_mean", spy)
    seam_losses(Ramp(21), torch.zeros(1, 3, 448, 448), torch.ones(1, 20))
    assert shapes == [((1, 21, 134, 134), 0.2)] * 2


def test_max_onehot_keeps_one_foreground_value_per_pixel():
    torch.manual_seed(0)
    p = torch.rand(2, 5, 7, 7)
    out = max_onehot(p)
    assert torch.equal(out[:, 0], p[:, 0])
    assert ((out[:, 1:] > 0).sum(1) == 1).all()
    assert torch.equal(out[:, 1:].amax(1), p[:, 1:].amax(1))
    before = p.clone()
    max_onehot(p)
    assert torch.equal(p, before)  # out of place (spec 6 #16)


def test_max_norm_spans_zero_to_one_per_channel():
    torch.manual_seed(0)
    p = torch.rand(2, 3, 8, 8) * 5 + 2  # a minimum above 0: it is subtracted
    n = max_norm(p)
    assert n.amin((2, 3)).max() == 0 and torch.allclose(n.amax((2, 3)), torch.ones(2, 3), atol=1e-4)


# ------------------------------------------------------------------------------------------ the method


def _seam_args(*flags: str, **overrides: object):
    args = run_sample.make_args(["--cam_method", "seam", "--num_workers", "0", "--work_dir", "unused", *flags])
    args.__dict__.update(overrides)
    return args


def test_seam_cams_are_non_negative_in_the_standard_format():
    torch.manual_seed(0)
    method = SEAM()
    model = method.build(_seam_args(backbone="efficientnet_lite0", backbone_weights="efficientnet_lite0_imagenet"),
                         20).eval()
    img = torch.rand(1, 3, 75, 101)
    with torch.no_grad():
        maps = method.cams(model, torch.cat([img, img.flip(-1)]))
    assert maps.shape == (2, 20, 5, 7) and maps.min() >= 0 and maps.max() > 0
    pairs = [torch.cat([s, s.flip(-1)]) for s in (img, F.interpolate(img, scale_factor=0.5))]
    cam, high_res = multiscale_cam(method, model, pairs, (75, 101), torch.tensor([3, 14]))
    assert cam.shape == (2, 19, 26) and high_res.shape == (2, 75, 101)
    for m in (cam, high_res):
        assert m.min() >= 0 and np.allclose(m.flatten(1).amax(1).numpy(), 1.0, atol=1e-3)


def test_seam_trains_one_poly_stage_with_its_flags():
    args = _seam_args("--seam_scale", "0.5", "--seam_ohem", "0.3", backbone_weights="none", cam_learning_rate=0.01)
    method = SEAM()
    built = method.build(args, 3)
    assert (method.scale, method.ohem) == (0.5, 0.3)  # the losses follow the flags
    assert built.backbone.frozen_levels == 3  # as the plain CAM network on EfficientNet-Lite0
    model = _net(num_classes=3, frozen_levels=1)
    backbone, head = model.param_groups()
    assert len(head) == 4 and len(backbone) == 2 * 4  # fc8, f8_3, f8_4, f9; levels 1-4 (weight, bias)
    [stage] = method.stages(args, steps_per_epoch=3, poly_length=lambda n: n)
    assert stage.steps == 3 * args.cam_num_epoches
    assert [g["lr"] for g in stage.make_optimizer(model).param_groups] == pytest.approx([0.01, 0.1])
    terms = method.losses(model, torch.randn(2, 3, 64, 64), _labels(2, 3))
    assert list(terms) == ["loss", "cls", "rvmin", "er", "ecr"]
    assert terms["loss"].item() == pytest.approx(sum(terms[k].item() for k in ("cls", "rvmin", "er", "ecr")),
                                                 rel=1e-6)


def test_resnet38_seam_is_the_papers_network_and_loads_a_seam_file(tmp_path: Path):
    torch.manual_seed(0)
    model = SEAMNet(ResNet38(), 20, frozen_levels=1)
    heads = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    assert heads == {"fc8.weight": (21, 4096, 1, 1), "f8_3.weight": (64, 512, 1, 1),
                     "f8_4.weight": (128, 1024, 1, 1), "f9.weight": (192, 195, 1, 1)}
    # Trained from b3 up, as SEAM: conv1a / b2* frozen.
    assert not any(p.requires_grad for p in model.backbone.b2_2.parameters())
    assert model.backbone.b3.conv_branch2a.weight.requires_grad
    # A released-layout file (backbone keys at the top level, DataParallel prefix) loads strictly.
    sd = {"module." + k.removeprefix("backbone."): v.clone() for k, v in model.state_dict().items()}
    sd["module.f9.weight"] += 1
    path = tmp_path / "resnet38_SEAM.pth"
    torch.save(sd, path)
    load_weights(model, path, "cam")
    assert torch.equal(model.f9.weight, sd["module.f9.weight"])
    with torch.no_grad():
        cam, cam_rv = model.eval()(torch.randn(1, 3, 64, 48), maps=True)
    assert cam.shape == cam_rv.shape == (1, 21, 8, 6)


def test_bad_seam_flags_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture):
    for flags, named in ((["--seam_scale", "0"], "--seam_scale"), (["--seam_scale", "1.5"], "--seam_scale"),
                         (["--seam_scale", "0.01"], "--seam_scale"), (["--seam_ohem", "0"], "--seam_ohem"),
                         (["--seam_ohem", "1.2"], "--seam_ohem")):
        assert run_sample.main(["--cam_method", "seam", "--work_dir", str(tmp_path / "w"), *flags]) == 2
        assert named in capsys.readouterr().err
        assert not (tmp_path / "w").exists()


def test_seam_with_cda_runs_end_to_end(tiny_run, tmp_path: Path):
    work = tmp_path / "seam"
    rows = tiny_run.rerun(work, "--cam_method", "seam")
    for variant in ("baseline", "cda"):
        log = [json.loads(line) for line in (work / variant / "sess" / "cam.pth.log.jsonl").read_text().splitlines()]
        assert len(log) == 3 * (64 // (8 if variant == "baseline" else 4))  # three epochs
        assert {"cls", "rvmin", "er", "ecr"} <= set(log[-1])
        cam_row = next(r for r in rows if r["step"] == "eval_cam" and r["variant"] == variant)
        mask_row = next(r for r in rows if r["step"] == "eval_sem_seg" and r["variant"] == variant
                        and r.get("postprocess") is None)
        # mIoU in percent: well above labelling everything background (~8.6 on this split, test_cam_stage);
        # measured 36.2 / 32.7 (CAM, best threshold) and 31.4 / 25.9 (masks), baseline / cda.
        assert max(cam_row["sweep"].values()) > 15 and mask_row["miou"] > 15
