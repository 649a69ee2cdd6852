"""CAM network: shapes, CAM identity, frozen levels and parameter groups."""

from __future__ import annotations

import pytest
import torch

from net.cam import CAMNet
from net.factory import build_backbone


@pytest.fixture(scope="module")
def net() -> CAMNet:
    torch.manual_seed(0)
    return CAMNet(build_backbone("resnet50"), num_classes=20)


def test_logits_and_cam_shapes(net):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits, cams = net(x), net.cam(x)
    assert logits.shape == (2, 20)
    assert cams.shape == (2, 20, 4, 6) and (cams >= 0).all()


def test_gap_of_class_map_equals_logits(net):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        class_map = net.classifier(net.backbone(x)[-1])
        assert (class_map < 0).any()  # otherwise the ReLU in cam() would not be exercised
        torch.testing.assert_close(class_map.mean((2, 3)), net(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net.cam(x), class_map.clamp(min=0))


def test_param_groups_exclude_frozen_levels(net):
    backbone_params, classifier_params = net.param_groups()
    assert classifier_params == [net.classifier.weight] and net.classifier.bias is None
    frozen = {id(p) for m in (net.backbone.conv1, net.backbone.bn1, net.backbone.layer1, net.backbone.layer2)
              for p in m.parameters()}
    trainable = {id(p) for m in (net.backbone.layer3, net.backbone.layer4) for p in m.parameters()}
    assert {id(p) for p in backbone_params} == trainable
    assert not frozen & trainable

    net.zero_grad()
    torch.nn.functional.multilabel_soft_margin_loss(net(torch.randn(2, 3, 64, 64)), torch.ones(2, 20)).backward()
    assert all(p.grad is not None for p in backbone_params + classifier_params)
    assert all(p.grad is None for p in net.backbone.layer2.parameters())
