"""ResNet-38 (PSA layout): size, levels, taps, freezing; MXNet .params reading and name conversion; loading PSA,
SEAM and CDA state dicts into the backbone (spec seam_affinitynet.md 1, 11.3.1-2).

The network has 105M parameters, so one instance is built per module (``model``) and one more where a second
is needed (``other``); inputs are tiny. The MXNet test files are written by a small writer of the NDArray
list format (``write_params``), independent of the reader under test.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import net.factory
from methods.cam import FROZEN_LEVELS
from misc import weights
from misc.convert import load_weights
from misc.errors import UserError
from misc.mxnet_params import convert_mxnet_names, read_params
from net.affinitynet import AffinityNet
from net.backbone import load_state, read_checkpoint
from net.cam import CAMNet
from net.deeplab import DeepLab
from net.factory import build_backbone
from net.irn import IRN
from net.resnet import ResNet
from net.resnet38 import ResNet38

N_PARAMS = 105_070_912
CHANNELS = (128, 256, 512, 1024, 4096)
STRIDES = (2, 4, 8, 8, 8)


def randomise_batchnorm(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine values: with the init ones (0, 1, 1, 0) a BN is almost the identity
    and a tap that skipped it would go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


@pytest.fixture(scope="module")
def shared() -> ResNet38:
    torch.manual_seed(0)
    model = ResNet38()
    randomise_batchnorm(model, 1)
    return model


@pytest.fixture
def model(shared: ResNet38) -> Iterator[ResNet38]:
    """The shared network in eval mode with nothing frozen (tests may freeze or train it)."""
    shared.freeze_levels(0)
    yield shared.eval()
    shared.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def other() -> ResNet38:
    """A second network with other random values, to load checkpoints into."""
    torch.manual_seed(1)
    return ResNet38().eval()


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


# ------------------------------------------------------------------------------------------- network


def test_parameter_and_key_counts(model: ResNet38) -> None:
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    keys = list(state(model))
    assert len(keys) == 191
    # PSA's names, including the two that only some blocks have.
    for key in ("conv1a.weight", "b2.conv_branch1.weight", "b4_5.bn_branch2b1.running_var",
                "b5.conv_branch2a.weight", "b6.bn_branch2b2.weight", "b7.conv_branch2b2.weight", "bn7.bias"):
        assert key in keys, key
    assert "b2_1.conv_branch1.weight" not in keys  # identity shortcut
    assert not any(k.endswith(".bias") and ".conv" in k for k in keys)  # no conv biases
    assert model.b5.conv_branch2a.dilation == (1, 1) and model.b5.conv_branch2b1.dilation == (2, 2)
    assert model.b7.conv_branch2b1.dilation == (4, 4)
    assert (model.b6.dropout_2b1.p, model.b6.dropout_2b2.p, model.b7.dropout_2b2.p) == (0.3, 0.3, 0.5)


@pytest.mark.parametrize(("h", "w"), [(64, 64), (67, 50)])
def test_level_shapes(model: ResNet38, h: int, w: int) -> None:
    assert model.channels == CHANNELS and model.strides == STRIDES
    with torch.no_grad():
        feats = model(torch.randn(1, 3, h, w))
    assert [tuple(f.shape) for f in feats] == [(1, c, -(-h // s), -(-w // s)) for c, s in
                                               zip(CHANNELS, STRIDES, strict=True)]
    assert (feats[4] >= 0).all()  # bn7 + ReLU
    assert (feats[2] < 0).any()  # levels 0-3 are raw residual sums


def test_taps_are_what_the_next_block_reads(model: ResNet38) -> None:
    """tap(2) / tap(3) are PSA's conv4 / conv5: the pre-activation b5 / b6 compute from their input. Checked
    by rebuilding b5's and b6's outputs from the taps with their convolutions only."""
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 40, 56))
        conv4, conv5 = model.tap(2, feats[2]), model.tap(3, feats[3])
        assert conv4.shape == (1, 512, 5, 7) and conv5.shape == (1, 1024, 5, 7)
        assert (conv4 >= 0).all() and (conv5 >= 0).all() and (conv4 == 0).any()
        b5, b6 = model.b5, model.b6
        from_conv4 = b5.conv_branch1(conv4) + b5.conv_branch2b1(F.relu(b5.bn_branch2b1(b5.conv_branch2a(conv4))))
        assert torch.allclose(from_conv4, b5(feats[2]), atol=1e-4)
        inner = b6.conv_branch2b1(F.relu(b6.bn_branch2b1(b6.conv_branch2a(conv5))))
        from_conv5 = b6.conv_branch1(conv5) + b6.conv_branch2b2(F.relu(b6.bn_branch2b2(inner)))
        assert torch.allclose(from_conv5, b6(feats[3]), atol=1e-3)
        assert model.tap(4, feats[4]) is feats[4]
        for level in (0, 1):  # the same rule below: b3 / b4 (SEAM's conv3) read these
            assert model.tap(level, feats[level]).shape == feats[level].shape
    with pytest.raises(ValueError, match="0..4"):
        model.tap(5, feats[4])


def test_freezing_follows_psa(model: ResNet38) -> None:
    model.freeze_levels(1)
    model.train()
    bn_params = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert len(bn_params) == 2 * 37 and not any(p.requires_grad for p in bn_params)
    low = [p for n, p in model.named_parameters() if n.startswith(("conv1a.", "b2."))
           or re.match(r"b2_\d\.", n)]
    assert low and not any(p.requires_grad for p in low)
    convs = [(n, p) for n, p in model.named_parameters() if ".conv_" in n and not n.startswith("b2")]
    assert len(convs) == 35 and all(p.requires_grad for _, p in convs)
    model(torch.randn(1, 3, 24, 24))[-1].sum().backward()
    assert model.b3.conv_branch2a.weight.grad is not None and model.b2_2.conv_branch2b1.weight.grad is None
    assert model.bn7.weight.grad is None
    # Unfreezing everything never re-enables BN (spec 1.5: BN is frozen in every network).
    model.freeze_levels(0)
    assert model.conv1a.weight.requires_grad and not any(p.requires_grad for p in bn_params)
    # Training mode: BN keeps its statistics (fixed BN), dropout in b6/b7 is active.
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        means = model.b3.bn_branch2a.running_mean.clone()
        a, b = model(x)[-1], model(x)[-1]
        assert torch.equal(means, model.b3.bn_branch2a.running_mean) and not torch.equal(a, b)
        assert torch.equal(model(x)[3], model(x)[3])  # no dropout below b6
        # PSA drops twice per bottleneck (before conv_branch2b1 and conv_branch2b2), MXNet A1 once: reproduced.
        seen: list[tuple[str, int]] = []
        hooks = [getattr(model, blk).get_submodule(d).register_forward_hook(
            lambda m, inp, out, name=f"{blk}.{d}": seen.append((name, out.shape[1])))
            for blk in ("b6", "b7") for d in ("dropout_2b1", "dropout_2b2")]
        model(x)
        for h in hooks:
            h.remove()
    assert seen == [("b6.dropout_2b1", 512), ("b6.dropout_2b2", 1024), ("b7.dropout_2b1", 1024),
                    ("b7.dropout_2b2", 2048)]


# --------------------------------------------------------------------------------------- conversion


def test_converter_examples() -> None:
    t = [torch.full((1,), float(i)) for i in range(6)]
    got = convert_mxnet_names({"arg:res2a_branch1_weight": t[0], "aux:bn4b3_branch2b1_moving_mean": t[1],
                               "arg:bn7_gamma": t[2], "arg:res6a_branch2b2_weight": t[3],
                               "arg:linear1000_weight": t[4], "arg:linear1000_bias": t[5]})
    assert got == {"b2.conv_branch1.weight": t[0], "b4_3.bn_branch2b1.running_mean": t[1], "bn7.weight": t[2],
                   "b6.conv_branch2b2.weight": t[3]}
    more = convert_mxnet_names({"arg:conv1a_weight": t[0], "arg:bn5b2_branch2a_beta": t[1],
                                "aux:bn3a_branch2a_moving_var": t[2], "aux:bn7_moving_mean": t[3]})
    assert list(more) == ["conv1a.weight", "b5_2.bn_branch2a.bias", "b3.bn_branch2a.running_var",
                          "bn7.running_mean"]


def test_converter_rejects_names_of_other_networks() -> None:
    with pytest.raises(UserError, match=r"resnet50\.params.*arg:fc1_weight"):
        convert_mxnet_names({"arg:conv1a_weight": torch.ones(1), "arg:fc1_weight": torch.ones(1)},
                            source="resnet50.params")


def mxnet_name(key: str) -> str:
    """PSA key -> the ademxapp MXNet name (the inverse of the conversion, written out by hand)."""
    bn = {"weight": "arg:{}_gamma", "bias": "arg:{}_beta", "running_mean": "aux:{}_moving_mean",
          "running_var": "aux:{}_moving_var"}
    if key == "conv1a.weight":
        return "arg:conv1a_weight"
    module, param = key.rsplit(".", 1)
    if module == "bn7":
        return bn[param].format("bn7")
    block, layer = module.split(".")
    level, _, k = block[1:].partition("_")
    unit = f"{level}a" if not k else f"{level}b{k}"
    kind, branch = layer.split("_")
    return f"arg:res{unit}_{branch}_weight" if kind == "conv" else bn[param].format(f"bn{unit}_{branch}")


def test_full_mxnet_state_converts_loads_and_reproduces(model: ResNet38, other: ResNet38) -> None:
    g = torch.Generator().manual_seed(2)
    mx = {mxnet_name(k): v for k, v in state(model).items()}
    mx["arg:linear1000_weight"], mx["arg:linear1000_bias"] = torch.randn(1000, 4096, generator=g), torch.zeros(1000)
    assert len(mx) == 193
    converted = convert_mxnet_names(mx, source="synthetic.params")
    assert set(converted) == set(state(model))
    assert load_state(other, converted, source="synthetic.params", ignore_prefixes=()).ok
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), other(x), strict=True))


def write_params(path: Path, arrays: dict[str, np.ndarray], version: str, *, magic: int = 0x112,
                 type_flag: int = 0, storage: int = 0) -> None:
    """An MXNet NDArray list file (``mx.nd.save`` layout) with the per-array header of ``version``."""
    out = [struct.pack("<QQQ", magic, 0, len(arrays))]
    for a in arrays.values():
        if version == "v2":
            out.append(struct.pack(f"<IiI{a.ndim}q", 0xF993FAC9, storage, a.ndim, *a.shape))
        elif version == "v1":
            out.append(struct.pack(f"<II{a.ndim}q", 0xF993FAC8, a.ndim, *a.shape))
        else:  # legacy: ndim and uint32 dims, no magic
            out.append(struct.pack(f"<I{a.ndim}I", a.ndim, *a.shape))
        out.append(struct.pack("<iii", 1, 0, type_flag))  # cpu(0), dtype
        out.append(a.astype("<f4").tobytes())
    out.append(struct.pack("<Q", len(arrays)))
    for name in arrays:
        out.append(struct.pack("<Q", len(name.encode())) + name.encode())
    path.write_bytes(b"".join(out))


def small_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"arg:conv1a_weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "aux:bn7_moving_var": rng.random(5).astype(np.float32),
            "arg:res2a_branch1_weight": rng.standard_normal((6, 4, 1, 1)).astype(np.float32),
            "arg:linear1000_bias": np.zeros(1000, np.float32)}


@pytest.mark.parametrize("version", ["v2", "v1", "legacy"])
def test_params_round_trip(tmp_path: Path, version: str) -> None:
    arrays = small_arrays()
    path = tmp_path / f"{version}.params"
    write_params(path, arrays, version)
    got = read_params(path)
    assert list(got) == list(arrays)
    for name, a in arrays.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], torch.from_numpy(a)), name


def test_read_checkpoint_converts_params_files(tmp_path: Path) -> None:
    arrays = small_arrays()
    path = tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    write_params(path, arrays, "legacy")
    got = read_checkpoint(path)
    assert list(got) == ["conv1a.weight", "bn7.running_var", "b2.conv_branch1.weight"]
    assert torch.equal(got["bn7.running_var"], torch.from_numpy(arrays["aux:bn7_moving_var"]))


@pytest.mark.parametrize("damage", ["magic", "truncated", "float64", "sparse", "names"])
def test_corrupt_params_name_the_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / f"broken_{damage}.params"
    arrays = small_arrays()
    write_params(path, arrays, "v2", magic=0x113 if damage == "magic" else 0x112,
                 type_flag=1 if damage == "float64" else 0, storage=2 if damage == "sparse" else 0)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:200])
    elif damage == "names":  # the name count no longer matches the arrays
        path.write_bytes(data[: data.index(b"arg:conv1a_weight") - 16] + struct.pack("<Q", 3) + b"\0" * 100)
    expected = {"magic": "bad magic", "truncated": "truncated", "float64": "float64", "sparse": "sparse",
                "names": "3 names"}[damage]
    with pytest.raises(UserError, match=re.escape(str(path))) as err:
        read_params(path)
    assert expected in str(err.value)


# ------------------------------------------------------------------------------------------- loading


def test_psa_checkpoint_with_module_prefix_and_heads_loads(tmp_path: Path, model: ResNet38) -> None:
    """A DataParallel-saved SEAM CAM net (backbone + fc8, f8_3, f8_4, f9) through the factory: heads skipped."""
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    sd |= {"module.fc8.weight": torch.randn(21, 4096, 1, 1), "module.f8_3.weight": torch.randn(64, 512, 1, 1),
           "module.f8_4.weight": torch.randn(128, 1024, 1, 1), "module.f9.weight": torch.randn(192, 195, 1, 1)}
    path = tmp_path / "seam_cam.pth"
    torch.save(sd, path)
    loaded = build_backbone("resnet38", path)
    own = state(loaded)
    assert set(own) == set(state(model)) and all(torch.equal(v, model.state_dict()[k]) for k, v in own.items())
    del loaded, own


def test_keys_that_fit_nothing_are_user_errors(model: ResNet38, other: ResNet38) -> None:
    sd = dict(state(model))
    sd["b8.conv_branch2a.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"odd\.pth(.|\n)*b8\.conv_branch2a\.weight"):
        load_state(other, sd, source="odd.pth", ignore_prefixes=ResNet38.head_prefixes)
    # A ResNet-38 file given to another backbone names the right flag.
    with pytest.raises(UserError, match="--backbone resnet38"):
        load_state(ResNet(50), state(model), source="psa.pth")


def test_factory_output_stride(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "resnet38" in net.factory.BACKBONE_NAMES
    with pytest.raises(UserError, match="--deeplab_output_stride 8"):
        build_backbone("resnet38", dilate=True, output_stride=16)
    monkeypatch.setattr(net.factory, "ResNet38", lambda: "built")  # accepted without building 105M parameters
    assert build_backbone("resnet38", dilate=True, output_stride=8) == "built"
    assert build_backbone("resnet38") == "built"


# ------------------------------------------------------------------------------ heads of other steps


@pytest.mark.parametrize("arch", ["v2", "v3+"])
def test_deeplab_heads_on_resnet38(model: ResNet38, arch: str) -> None:
    torch.manual_seed(0)
    deeplab = DeepLab(model, arch, 21).eval()
    with torch.no_grad():
        logits = deeplab(torch.randn(1, 3, 45, 38), upsample=False)
    # v3+ decodes on level 1, the stride-4 level (level 0 is at stride 2).
    assert logits.shape == ((1, 21, 6, 5) if arch == "v2" else (1, 21, 12, 10))
    if arch == "v3+":
        assert deeplab.low_level == 1


def test_irn_heads_on_resnet38(model: ResNet38) -> None:
    torch.manual_seed(0)
    irn = IRN(model).eval()
    edge, disp = irn(torch.randn(1, 3, 45, 38))
    assert edge.shape == (1, 1, 12, 10) and disp.shape == (1, 2, 12, 10)
    assert torch.isfinite(edge).all() and torch.isfinite(disp).all()


def test_registry_lists_the_resnet38_files() -> None:
    reg = weights.registry()
    imagenet = reg["resnet38d_a1_imagenet"]
    assert imagenet.file.endswith(".params") and imagenet.initialises == "backbone"
    expected = {"cda_resnet38_seam_cam": ("14ewWX7v0E9HWf1Azu3ttnvd6gDRcbvXG", "cam"),
                "cda_resnet38_psa_cam": ("1sPcJor5-61VJicvONJWVO_7HI8aK14ua", "cam"),
                "cda_resnet38_seam_aff": ("1wnbLQeStSrTkw2UvatOgZNEtaZZLvehx", "affinity"),
                "cda_resnet38_psa_aff": ("1p7s2RKbVVhVnTHETxDbRBE8_ropS0T_3", "affinity")}
    for name, (drive_id, initialises) in expected.items():
        e = reg[name]
        assert e.urls == (f"https://drive.google.com/uc?export=download&id={drive_id}",), name
        assert (e.initialises, e.backbone, e.sha256) == (initialises, "resnet38", None)
        assert "unverified" in e.note
    assert {e.name for e in reg.values() if e.backbone == "resnet38"} == {"resnet38d_a1_imagenet", *expected}


# ------------------------------------------------------------------- PSA / SEAM / CDA whole networks


def test_psa_cam_and_affinity_files_load_into_our_networks(tmp_path: Path, model: ResNet38, other: ResNet38):
    # A PSA / CDA CAM network file: backbone keys at the top level, the classifier as fc8, saved from
    # DataParallel; it must load into our CAM network with every tensor in its place.
    torch.manual_seed(2)
    cam = CAMNet(model, 20, frozen_levels=FROZEN_LEVELS["resnet38"])
    psa_cam = {"module." + k.removeprefix("backbone.").replace("classifier.", "fc8."): v
               for k, v in state(cam).items()}
    assert "module.fc8.weight" in psa_cam and "module.b4_5.conv_branch2b1.weight" in psa_cam
    torch.save(psa_cam, tmp_path / "psa_cam.pth")
    ours = CAMNet(other, 20, frozen_levels=FROZEN_LEVELS["resnet38"])
    load_weights(ours, tmp_path / "psa_cam.pth", "cam")
    x = torch.randn(1, 3, 40, 48)
    assert torch.equal(ours.eval().cam(x), cam.eval().cam(x))

    aff = AffinityNet(model)
    psa_aff = {k.removeprefix("backbone."): v for k, v in state(aff).items()}
    assert {"f8_3.weight", "f8_4.weight", "f8_5.weight", "f9.weight"} <= set(psa_aff)
    assert psa_aff["f9.weight"].shape == (448, 448, 1, 1) and psa_aff["f8_5.weight"].shape == (256, 4096, 1, 1)
    torch.save(psa_aff, tmp_path / "psa_aff.pth")
    ours_aff = AffinityNet(other)
    load_weights(ours_aff, tmp_path / "psa_aff.pth", "affinity")
    assert torch.equal(ours_aff.eval()(x), aff.eval()(x))
    # An AffinityNet file where CAM weights go: its heads are named, and nothing loads.
    with pytest.raises(UserError, match="f8_3"):
        load_weights(CAMNet(ResNet38(), 20), tmp_path / "psa_aff.pth", "cam")
