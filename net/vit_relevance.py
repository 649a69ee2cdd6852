"""Class relevance maps of a ViT classifier (orandnet spec 4.3): LRP transformer attribution (Chefer, Gur and
Wolf, "Transformer Interpretability Beyond Attention Visualization", CVPR 2021) and its lighter gradient x
attention variant (Chefer et al., ICCV 2021, "generic attention-model explainability").

For a class ``k`` of an image:

1. one recorded forward pass (``VisionTransformer.forward_record``); ``grad_b``, the gradient of logit ``k``
   with respect to every block's attention probabilities ``A_b (heads, N, N)``;
2. ``lrp``: relevance propagated from the one-hot of ``k`` back through the head, the CLS selection, the final
   norm and the blocks with the rules below; ``R_b`` is the relevance arriving at ``A_b``.
   ``grad_attn``: ``R_b = A_b`` (no propagation);
3. ``Abar_b = mean over heads of max(0, grad_b * R_b)``; rollout ``B_b = (Abar_b + I) / rowsum(Abar_b + I)``,
   ``C = B_L ... B_1``; the map is ``C[CLS, patches]`` on the patch grid, min-max normalised to [0, 1].

LRP rules (spec 4.3's table), each a function here so that it can be checked on its own:

=============================  ===============================================================================
layer                          rule
=============================  ===============================================================================
Linear                         alpha = 1, beta = 0: ``x+ * (S @ W+) + x- * (S @ W-)``, ``S = R / (W+ x+ + W- x-)``
                               (bias ignored): :func:`lrp_linear`
LayerNorm, GELU, softmax,      relevance passes unchanged
layer scale, dropout
residual add ``a + b``         gradient x input per operand, each rescaled so that the two shares of ``R.sum()``
                               are proportional to ``|sum|`` of their raw relevance: :func:`lrp_add`
clone (residual fork)          ``x * sum_i(R_i / x)``: the copies' relevance summed: :func:`lrp_clone`
``Q K^T`` and ``A V``          gradient x input for both operands (:func:`lrp_matmul`), each then halved
CLS selection                  the relevance goes back to the CLS position
=============================  ===============================================================================

Sums of the residual rule are taken per image (the reference sums over its batch, which is one image).
Layer scale (DINOv2) is an element-wise scale, treated like LayerNorm's affine part: relevance passes unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from net.vit import Trace, VisionTransformer

MODES = ("lrp", "grad_attn")


def safe_divide(a: Tensor, b: Tensor, eps: float = 1e-9) -> Tensor:
    """``a / b`` where ``b`` is stabilised away from 0 by ``eps`` with its sign, and 0 where ``b == 0``."""
    den = b + eps * torch.where(b >= 0, 1.0, -1.0).to(b.dtype)
    return torch.where(b == 0, torch.zeros_like(a), a / den)


def lrp_linear(x: Tensor, weight: Tensor, r: Tensor) -> Tensor:
    """Relevance ``r (..., out)`` at the output of ``x @ weight.T`` -> relevance at ``x (..., in)`` (alpha 1,
    beta 0). Conserves ``r``'s sum per position, except the relevance of outputs that no input excites
    (``W+ x+ + W- x- = 0``), which is dropped."""
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    s = safe_divide(r, xp @ wp.t() + xn @ wn.t())
    return xp * (s @ wp) + xn * (s @ wn)


def lrp_add(a: Tensor, b: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance ``r`` of ``a + b`` (all ``(B, ...)``) -> ``(r_a, r_b)``: gradient x input (``a * r / (a + b)``),
    then per image each operand rescaled so that ``r_a.sum() : r_b.sum() = |raw_a.sum()| : |raw_b.sum()|`` and
    ``r_a.sum() + r_b.sum() = r.sum()`` (conservation)."""
    s = safe_divide(r, a + b)
    ra, rb = a * s, b * s
    dims = tuple(range(1, r.dim()))
    sa, sb, total = ra.sum(dims, keepdim=True), rb.sum(dims, keepdim=True), r.sum(dims, keepdim=True)
    share_a = safe_divide(sa.abs(), sa.abs() + sb.abs()) * total
    share_b = safe_divide(sb.abs(), sa.abs() + sb.abs()) * total
    return ra * safe_divide(share_a, sa), rb * safe_divide(share_b, sb)


def lrp_clone(x: Tensor, rs: list[Tensor]) -> Tensor:
    """Relevance of the copies of ``x`` (one tensor per copy, each of ``x``'s shape) -> relevance at ``x``:
    ``x * sum_i safe_divide(R_i, x)``, i.e. their sum wherever ``x != 0``."""
    return x * sum(safe_divide(r, x) for r in rs)


def lrp_matmul(a: Tensor, b: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance ``r (..., n, m)`` of ``a @ b`` (``a (..., n, k)``, ``b (..., k, m)``) -> gradient x input for
    each operand, ``(a * (S @ b^T), b * (a^T @ S))`` with ``S = r / (a @ b)``; each sums to ``r``'s sum (the
    caller halves them: both operands share the relevance)."""
    s = safe_divide(r, a @ b)
    return a * (s @ b.transpose(-2, -1)), b * (a.transpose(-2, -1) @ s)


def _block_relprop(block: torch.nn.Module, rec: dict[str, Tensor], r: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance ``r (B, N, D)`` at a block's output -> ``(relevance at its input, R_b at its attention
    probabilities (B, h, N, N))``, from the block's forward record."""
    r_mid_skip, r_mlp = lrp_add(rec["mid"], rec["mlp_branch"], r)
    # Layer scale and GELU pass relevance unchanged; fc2 then fc1.
    r_h2 = lrp_linear(rec["h2"], block.mlp.fc1.weight, lrp_linear(rec["g"], block.mlp.fc2.weight, r_mlp))
    r_mid = lrp_clone(rec["mid"], [r_mid_skip, r_h2])  # norm2 passes relevance unchanged
    r_x_skip, r_attn = lrp_add(rec["x"], rec["attn_branch"], r_mid)
    b, n, d = r_attn.shape
    heads = block.attn.heads
    r_o = lrp_linear(rec["o"], block.attn.proj.weight, r_attn).reshape(b, n, heads, d // heads).transpose(1, 2)
    r_a, r_v = lrp_matmul(rec["attn"], rec["v"], r_o)
    r_a, r_v = r_a / 2, r_v / 2
    # Softmax passes relevance unchanged; the scale of q k^T cancels in gradient x input.
    r_q, r_kt = lrp_matmul(rec["q"], rec["k"].transpose(-2, -1), r_a)
    r_q, r_k = r_q / 2, r_kt.transpose(-2, -1) / 2
    r_qkv = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4).reshape(b, n, 3 * d)  # qkv's output layout
    r_h1 = lrp_linear(rec["h1"], block.attn.qkv.weight, r_qkv)
    return lrp_clone(rec["x"], [r_x_skip, r_h1]), r_a  # norm1 passes relevance unchanged


def lrp_attention_relevance(model: VisionTransformer, trace: Trace, classes: Tensor) -> list[Tensor]:
    """``R_b (B, h, N, N)`` of every block, propagated from the one-hot of ``classes (B,)`` (one class per image)."""
    one_hot = torch.zeros_like(trace.logits)
    one_hot[torch.arange(len(classes)), classes] = 1
    r_cls = lrp_linear(trace.cls, model.head.weight, one_hot)
    r = torch.zeros_like(trace.last)
    r[:, 0] = r_cls  # CLS selection; the final norm passes relevance unchanged
    relevances = []
    for block, rec in zip(reversed(model.blocks), reversed(trace.blocks), strict=True):
        r, r_attn = _block_relprop(block, rec, r)
        relevances.append(r_attn)
    return relevances[::-1]


def rollout(abar: list[Tensor]) -> Tensor:
    """Per-block ``Abar_b (B, N, N)``, first block first -> ``C = B_L ... B_1`` with ``B_b = (Abar_b + I)``
    divided by its row sums (spec 4.3 step 5); ``(B, N, N)``, row-stochastic."""
    eye = torch.eye(abar[0].shape[-1], dtype=abar[0].dtype, device=abar[0].device)
    joint = None
    for a in abar:
        m = a + eye
        m = m / m.sum(-1, keepdim=True)
        joint = m if joint is None else m @ joint
    return joint


def min_max(maps: Tensor, eps: float = 1e-8) -> Tensor:
    """``(B, ...)`` -> each map shifted and scaled to [0, 1]; a constant map (no contrast, e.g. the uniform
    rollout of attention-free blocks) becomes 0 rather than a division by zero."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = hi - lo
    out = torch.where(span > eps, (flat - lo) / span.clamp_min(eps), torch.zeros_like(flat))
    return out.reshape(maps.shape)


def relevance_maps(model: VisionTransformer, x: Tensor, classes: Tensor, mode: str = "lrp") -> Tensor:
    """Relevance maps of ``classes (B,)``, one class per image of ``x (B, 3, H, W)``: ``(B, gh, gw)`` on the
    patch grid, each min-max normalised to [0, 1] (spec 4.3 steps 1-6). Runs with gradients on and in float32
    whatever the caller's mode (make_cam's ``no_grad`` and autocast); ``model`` is left unchanged (no ``.grad``)."""
    if mode not in MODES:
        raise ValueError(f"unknown relevance mode {mode!r}: choose one of {', '.join(MODES)}")
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        # The input requires grad so that the graph exists even if every parameter is frozen.
        trace = model.forward_record(x.float().detach().requires_grad_(True))
        attns = [rec["attn"] for rec in trace.blocks]
        score = trace.logits.gather(1, classes[:, None]).sum()
        grads = torch.autograd.grad(score, attns)
    with torch.no_grad():
        trace.blocks = [{k: v.detach() for k, v in rec.items()} for rec in trace.blocks]
        trace.cls, trace.last = trace.cls.detach(), trace.last.detach()
        trace.logits = trace.logits.detach()
        # grad_attn: the attention probabilities themselves stand in for their LRP relevance (ICCV 2021).
        rel = lrp_attention_relevance(model, trace, classes) if mode == "lrp" else [r["attn"] for r in trace.blocks]
        abar = [(g * r).clamp(min=0).mean(1) for g, r in zip(grads, rel, strict=True)]
        cls_row = rollout(abar)[:, 0, 1:]
        return min_max(cls_row.reshape(len(x), *trace.grid))
