"""IRN heads, losses (hand-computed values) and inference helpers, on a fake and on a real backbone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from misc.indexing import PathIndex, affinity_labels
from net.irn import IRN, edge_and_displacement, estimate_mean_shift, irn_loss
from net.resnet import ResNet


class FakeBackbone(nn.Module):
    """Five levels of average pooling + 1x1 conv; ``ceil`` rounding gives the usual conv arithmetic,
    floor rounding leaves coarse levels a pixel short (exercises the heads' padding)."""

    def __init__(self, channels: tuple[int, ...] = (8, 16, 24, 32, 40),
                 strides: tuple[int, ...] = (4, 4, 8, 16, 16), ceil: bool = True) -> None:
        super().__init__()
        self.channels, self.strides, self.ceil = channels, strides, ceil
        self.convs = nn.ModuleList(nn.Conv2d(3, c, 1) for c in channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [conv(F.avg_pool2d(x, s, s, ceil_mode=self.ceil)) for conv, s in
                zip(self.convs, self.strides, strict=True)]

    def tap(self, level: int, x: Tensor) -> Tensor:
        return x

    def freeze_levels(self, n: int) -> None:
        for conv in self.convs[:n]:
            conv.requires_grad_(False)


@pytest.mark.parametrize("backbone", [
    FakeBackbone(),
    FakeBackbone(ceil=False),
    FakeBackbone(strides=(4, 4, 8, 8, 8)),  # dilated variant
    FakeBackbone(strides=(2, 4, 8, 16, 32)),  # one level finer, one coarser than IRNet's
])
@pytest.mark.parametrize(("h", "w"), [(50, 70), (37, 61)])
def test_forward_shapes(backbone: nn.Module, h: int, w: int) -> None:
    torch.manual_seed(0)
    model = IRN(backbone)
    edge, disp = model(torch.randn(2, 3, h, w))
    h4, w4 = (h - 1) // 4 + 1, (w - 1) // 4 + 1
    assert edge.shape == (2, 1, h4, w4) and disp.shape == (2, 2, h4, w4)
    assert torch.isfinite(edge).all() and torch.isfinite(disp).all()


def test_real_resnet_backbone() -> None:
    torch.manual_seed(0)
    model = IRN(ResNet(50)).eval()
    for h, w in ((45, 67), (70, 38)):
        edge, disp = model(torch.randn(1, 3, h, w))
        assert edge.shape == (1, 1, (h - 1) // 4 + 1, (w - 1) // 4 + 1)
        assert disp.shape == (1, 2, (h - 1) // 4 + 1, (w - 1) // 4 + 1)


def test_state_dict_names_follow_the_reference() -> None:
    keys = set(IRN(FakeBackbone()).state_dict())
    for key in ("edge1.0.weight", "edge1.1.weight", "edge5.1.bias", "edge6.weight", "edge6.bias",
                "dp1.0.weight", "dp6.1.weight", "dp7.0.weight", "dp7.1.bias", "dp7.3.weight",
                "mean_shift.running_mean"):
        assert key in keys, key
    assert "dp7.3.bias" not in keys and "edge1.0.bias" not in keys


def _labels(batch: int) -> tuple[PathIndex, Tensor, Tensor, Tensor]:
    """The hand-counted 6x6 map of test_indexing: 25 bg, 30 fg and 13 neg pairs per image (radius 2)."""
    label = np.zeros((6, 6), np.uint8)
    label[:, 3:] = 1
    label[5] = 255
    pi = PathIndex(2, (6, 6))
    bg, fg, neg = (t.expand(batch, -1, -1) for t in affinity_labels(label, pi))
    return pi, bg, fg, neg


def test_losses_match_hand_computation() -> None:
    pi, bg, fg, neg = _labels(2)
    p = 0.3
    logits = torch.full((2, 1, 6, 6), math.log(p / (1 - p)), requires_grad=True)
    # Image 0: zero displacement. Image 1: D(y, x) = -(y, x), so D(src) - D(dst) equals every offset.
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    disp = torch.stack([torch.zeros(2, 6, 6), -torch.stack([ys, xs])]).requires_grad_(True)
    losses = irn_loss(logits, disp, bg, fg, neg, pi)

    # Constant edge probability p: every pair has affinity 1 - p. Counts are over both images.
    l_pos = -math.log(1 - p + 1e-5)
    pos = (l_pos * 50 / (50 + 1e-5) + l_pos * 60 / (60 + 1e-5)) / 2
    neg_term = -math.log(1 + 1e-5 - (1 - p)) * 26 / (26 + 1e-5)
    # fg pairs per offset: (0,1) 10, (1,-1) 4, (1,0) 8, (1,1) 8 -> sum |dy|+|dx| = 42, image 0 only.
    dfg = 42 / (2 * 60 + 1e-5)
    # bg pairs per offset: (0,1) 5, (1,-1) 8, (1,0) 8, (1,1) 4 -> sum |dy|+|dx| = 37, image 1 only.
    dbg = 37 / (2 * 50 + 1e-5)
    expected = {"pos": pos, "neg": neg_term, "dfg": dfg, "dbg": dbg,
                "total": (pos + neg_term) / 2 + (dfg + dbg) / 2}
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name

    losses["total"].backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    assert disp.grad is not None and float(disp.grad.abs().sum()) > 0


def test_backbone_is_frozen_and_heads_train() -> None:
    torch.manual_seed(0)
    backbone = FakeBackbone()
    model = IRN(backbone).train()
    assert model.training and not backbone.training
    pi, bg, fg, neg = _labels(2)
    edge, disp = model(torch.randn(2, 3, 24, 24))  # /4 grid 6 x 6
    irn_loss(edge, disp, bg, fg, neg, pi)["total"].backward()
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    heads = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert all(p.grad is not None for p in heads)

    groups = model.param_groups(0.1)
    assert [g["lr"] for g in groups] == [0.1, pytest.approx(1.0)]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in heads}
    assert len(groups[0]["params"]) == 5 * 3 + 2  # edge1..5: conv + GN weight/bias; edge6: weight, bias


def test_eval_subtracts_running_mean() -> None:
    torch.manual_seed(0)
    model = IRN(FakeBackbone())
    x = torch.randn(1, 3, 30, 41)
    _, train_disp = model.train()(x)
    model.mean_shift.running_mean.copy_(torch.tensor([0.5, -1.0]))
    _, eval_disp = model.eval()(x)
    torch.testing.assert_close(eval_disp, train_disp - torch.tensor([0.5, -1.0]).view(1, 2, 1, 1))


def test_edge_and_displacement() -> None:
    torch.manual_seed(0)
    model = IRN(FakeBackbone())
    img = torch.randn(1, 3, 45, 58)
    with pytest.raises(ValueError):
        edge_and_displacement(model.train(), img)
    model.eval()
    model.mean_shift.running_mean.copy_(torch.tensor([0.25, 0.5]))
    edge, disp = edge_and_displacement(model, img)
    assert edge.shape == (12, 15) and disp.shape == (2, 12, 15)
    with torch.no_grad():
        e0, d0 = model(img)
        e1, _ = model(img.flip(-1))
    torch.testing.assert_close(edge, torch.sigmoid((e0[0, 0] + e1[0, 0].flip(-1)) / 2))
    torch.testing.assert_close(disp, d0[0])


def test_estimate_mean_shift() -> None:
    torch.manual_seed(0)
    model = IRN(FakeBackbone())
    model.mean_shift.running_mean.fill_(3.0)  # stale value: estimation must start from zero
    batches = [{"img": torch.randn(2, 3, 32, 32)}, {"img": torch.randn(2, 3, 32, 32)}]
    mean = estimate_mean_shift(model, batches)
    model.mean_shift.running_mean.zero_()
    with torch.no_grad():
        expected = torch.stack([model(b["img"])[1].mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(mean, expected)
    model.mean_shift.running_mean.copy_(mean)
    assert not model.training
    with torch.no_grad():
        centred = torch.stack([model(b["img"])[1].mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(centred, torch.zeros(2), atol=1e-5, rtol=0)
