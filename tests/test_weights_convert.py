"""misc.weights conversion: checkpoints in the reference IRNet/CDA key layout load into our CAMNet and IRN.

The reference state dicts are built by hand from the reference naming (torchvision ResNet-50 names under
``resnet50.``, repeated under ``stageN.`` and the ``backbone`` ModuleList; ``classifier``; ``fc_edge1..6``,
``fc_dp1..7`` with MeanShift inside ``fc_dp7``; pair-index buffers), with random tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from misc import convert
from misc.errors import UserError
from net.cam import CAMNet
from net.factory import build_backbone
from net.irn import IRN


def torchvision_resnet50() -> dict[str, Tensor]:
    """Random tensors under torchvision's ResNet-50 names (without ``fc``, as the reference saves it)."""
    sd: dict[str, Tensor] = {}

    def conv(name: str, out_ch: int, in_ch: int, k: int) -> None:
        sd[name + ".weight"] = torch.randn(out_ch, in_ch, k, k)

    def bn(name: str, ch: int) -> None:
        sd[name + ".weight"], sd[name + ".bias"] = torch.randn(ch), torch.randn(ch)
        sd[name + ".running_mean"], sd[name + ".running_var"] = torch.randn(ch), torch.rand(ch) + 0.5
        sd[name + ".num_batches_tracked"] = torch.tensor(0)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    in_ch = 64
    for layer, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            conv(p + ".conv1", width, in_ch, 1)
            bn(p + ".bn1", width)
            conv(p + ".conv2", width, width, 3)
            bn(p + ".bn2", width)
            conv(p + ".conv3", width * 4, width, 1)
            bn(p + ".bn3", width * 4)
            if b == 0:
                conv(p + ".downsample.0", width * 4, in_ch, 1)
                bn(p + ".downsample.1", width * 4)
            in_ch = width * 4
    return sd


def with_aliases(resnet: dict[str, Tensor], stage_of: dict[str, tuple[str, str]]) -> dict[str, Tensor]:
    """``resnet50.<name>`` plus the same tensor under each reference alias of its torchvision module."""
    sd = {}
    for key, t in resnet.items():
        sd["resnet50." + key] = t
        module, rest = key.split(".", 1)
        for alias in stage_of[module]:
            sd[f"{alias}.{rest}"] = t
    return sd


def reference_cam() -> dict[str, Tensor]:
    """The state dict of the reference ``net/resnet50_cam.py`` Net."""
    stage_of = {"conv1": ("stage1.0", "backbone.0.0"), "bn1": ("stage1.1", "backbone.0.1"),
                "layer1": ("stage1.4", "backbone.0.4")}
    stage_of |= {f"layer{k}": (f"stage{k}.0", f"backbone.{k - 1}.0") for k in (2, 3, 4)}
    sd = with_aliases(torchvision_resnet50(), stage_of)
    sd["classifier.weight"] = sd["newly_added.0.weight"] = torch.randn(20, 2048, 1, 1)
    return sd


def reference_irn() -> dict[str, Tensor]:
    """The state dict of the reference ``net/resnet50_irn.py`` AffinityDisplacementLoss after training."""
    stage_of = {"conv1": ("stage1.0", "backbone.0.0"), "bn1": ("stage1.1", "backbone.0.1")}
    stage_of |= {f"layer{k}": (f"stage{k + 1}.0", f"backbone.{k}.0") for k in (1, 2, 3, 4)}
    sd = with_aliases(torchvision_resnet50(), stage_of)
    mean = torch.randn(2)
    sd["mean_shift.running_mean"] = mean

    def head(names: tuple[str, str], out_ch: int, in_ch: int, groups: int) -> None:
        w, g, b = torch.randn(out_ch, in_ch, 1, 1), torch.randn(out_ch), torch.randn(out_ch)
        for n in names:
            sd[n + ".0.weight"], sd[n + ".1.weight"], sd[n + ".1.bias"] = w, g, b

    for i, in_ch in enumerate((64, 256, 512, 1024, 2048), start=1):
        head((f"fc_edge{i}", f"edge_layers.{i - 1}"), 32, in_ch, 4)
    w6, b6 = torch.randn(1, 160, 1, 1), torch.randn(1)
    for n in ("fc_edge6", "edge_layers.5"):
        sd[n + ".weight"], sd[n + ".bias"] = w6, b6
    dp = {1: (64, 64), 2: (128, 256), 3: (256, 512), 4: (256, 1024), 5: (256, 2048), 6: (256, 768), 7: (256, 448)}
    for i, (out_ch, in_ch) in dp.items():
        head((f"fc_dp{i}", f"dp_layers.{i - 1}"), out_ch, in_ch, 16)
    w7 = torch.randn(2, 256, 1, 1)
    for n in ("fc_dp7", "dp_layers.6"):
        sd[n + ".3.weight"], sd[n + ".4.running_mean"] = w7, mean
    for i in range(3):  # training-only pair indices and displacement targets
        sd[f"path_indices{i}"] = torch.randint(0, 100, (4, 5, 6))
    sd["disp_target"] = torch.randn(1, 2, 30, 1)
    return sd


@pytest.fixture(scope="module")
def ref_cam() -> dict[str, Tensor]:
    return reference_cam()


@pytest.fixture(scope="module")
def ref_irn() -> dict[str, Tensor]:
    return reference_irn()


@pytest.fixture(scope="module")
def cam_file(ref_cam: dict[str, Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "res50_cam.pth"
    torch.save(ref_cam, path)
    return path


def cam_net() -> CAMNet:
    return CAMNet(build_backbone("resnet50"), 20)


def assert_loaded(model: torch.nn.Module, ref: dict[str, Tensor], source_of: dict[str, str]) -> None:
    """Every tensor of ``model`` equals the reference tensor whose name ``source_of`` gives."""
    checked = 0
    for key, tensor in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        ours = next(p for p in source_of if key.startswith(p))
        assert torch.equal(tensor, ref[source_of[ours] + key[len(ours):]]), key
        checked += 1
    assert checked > 250  # ResNet-50 alone has 265 tensors besides num_batches_tracked


CAM_SOURCES = {"backbone.": "resnet50.", "classifier.": "classifier."}


def test_reference_cam_loads_with_identical_tensors(cam_file: Path, ref_cam: dict[str, Tensor]) -> None:
    model = cam_net()
    assert convert.load_weights(model, str(cam_file), "cam").ok
    assert_loaded(model, ref_cam, CAM_SOURCES)


def test_dataparallel_prefix_and_double_suffix(tmp_path: Path, ref_cam: dict[str, Tensor]) -> None:
    torch.save({"module." + k: v for k, v in ref_cam.items()}, tmp_path / "res50_cam.pth.pth")
    model = cam_net()
    assert convert.load_weights(model, str(tmp_path / "res50_cam.pth"), "cam").ok
    assert_loaded(model, ref_cam, CAM_SOURCES)


def test_reference_irn_loads_with_identical_tensors(tmp_path: Path, ref_irn: dict[str, Tensor]) -> None:
    torch.save(ref_irn, tmp_path / "res50_irn.pth")
    model = IRN(build_backbone("resnet50"))
    assert convert.load_weights(model, str(tmp_path / "res50_irn.pth"), "irn").ok
    sources = {"backbone.": "resnet50.", "mean_shift.": "mean_shift."}
    sources |= {f"edge{i}.": f"fc_edge{i}." for i in range(1, 7)} | {f"dp{i}.": f"fc_dp{i}." for i in range(1, 8)}
    assert_loaded(model, ref_irn, sources)


def test_own_checkpoint_loads_unchanged(tmp_path: Path) -> None:
    src = cam_net()
    torch.save(src.state_dict(), tmp_path / "cam.pth")
    dst = cam_net()
    assert convert.load_weights(dst, str(tmp_path / "cam.pth"), "cam").ok
    for key, tensor in src.state_dict().items():
        assert torch.equal(tensor, dst.state_dict()[key])


def test_checkpoint_of_the_other_network_fails_clearly(ref_cam: dict[str, Tensor],
                                                       ref_irn: dict[str, Tensor]) -> None:
    with pytest.raises(UserError, match=r"no place in our cam network(?s:.*)reference IRN checkpoint"):
        convert.convert_reference_checkpoint(ref_irn, "cam")
    with pytest.raises(UserError, match=r"no place in our irn network(?s:.*)reference CAM checkpoint"):
        convert.convert_reference_checkpoint(ref_cam, "irn")


def test_unknown_keys_fail_unless_partial(tmp_path: Path, ref_cam: dict[str, Tensor]) -> None:
    odd = {k: v for k, v in ref_cam.items() if k not in ("classifier.weight", "newly_added.0.weight")}
    odd["stage9.extra.weight"] = torch.zeros(1)
    torch.save(odd, tmp_path / "odd.pth")
    model = cam_net()
    with pytest.raises(UserError, match=r"stage9\.extra\.weight"):
        convert.load_weights(model, str(tmp_path / "odd.pth"), "cam")
    report = convert.load_weights(model, str(tmp_path / "odd.pth"), "cam", partial=True)
    assert report.missing == ["classifier.weight"] and not report.unexpected
    assert torch.equal(model.backbone.conv1.weight, ref_cam["resnet50.conv1.weight"])


def test_inconsistent_duplicates_fail(ref_cam: dict[str, Tensor]) -> None:
    bad = dict(ref_cam)
    bad["stage2.0.0.conv1.weight"] = torch.zeros_like(bad["stage2.0.0.conv1.weight"])
    with pytest.raises(UserError, match="inconsistent reference checkpoint"):
        convert.convert_reference_checkpoint(bad, "cam")


def test_wrong_backbone_depth_fails(cam_file: Path) -> None:
    with pytest.raises(UserError, match=r"missing(?s:.*)backbone\.layer3\.6\."):
        convert.load_weights(CAMNet(build_backbone("resnet101"), 20), str(cam_file), "cam")
