"""Backbone interface, fixed BatchNorm and checkpoint reading/loading (the factory: ``net.factory``).

Every backbone maps a normalised RGB batch ``(B, 3, H, W)`` (ImageNet mean/std, spec 1.4) to a list of
five feature maps ``[x1..x5]``; ``channels`` and ``strides`` describe them, and ``tap(level, x)`` turns a
level's map into the feature a head reads there (identity except for pre-activation networks such as
ResNet-38, whose level outputs are raw residual sums). See docs/DESIGN.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from misc.errors import UserError
from misc.mxnet_params import load_mxnet_resnet38

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Classifier heads of the source formats (torchvision ``fc``, EfficientNet ``_fc``); backbones have none.
CLASSIFIER_PREFIXES: tuple[str, ...] = ("fc.", "_fc.")


class FixedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with the stored running statistics.

    Behaves like ``nn.BatchNorm2d`` in eval mode even while training (running stats are never updated),
    so results do not depend on the per-device batch size; ``weight``/``bias`` stay learnable. Parameter
    and buffer names equal ``nn.BatchNorm2d``'s, so standard checkpoints load unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


class Backbone(nn.Module):
    """Feature extractor with five output levels.

    Subclasses set ``name``, ``channels`` and ``strides`` and implement :meth:`level_modules`; the
    modules of level ``i`` are applied in order to the output of level ``i - 1``. ``head_prefixes``: keys of
    full-network checkpoints (classifier / method heads) that ``net.factory`` skips when it loads only the
    backbone.
    """

    name: str
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    head_prefixes: tuple[str, ...] = CLASSIFIER_PREFIXES

    def __init__(self) -> None:
        super().__init__()
        self.frozen_levels = 0

    def level_modules(self) -> list[list[nn.Module]]:
        """The modules of each of the five levels, in application order."""
        raise NotImplementedError

    def forward(self, x: Tensor, first_level: int = 0) -> list[Tensor]:
        """``(B, 3, H, W)`` normalised RGB -> 5 maps ``(B, channels[i], ~H/strides[i], ~W/strides[i])``.

        With ``first_level = k``, ``x`` is a level ``k - 1`` map and only levels ``k..4`` run (their maps are
        returned): the upper part of the network on a feature map, e.g. a PPL patch (``net.ppl``).
        """
        feats = []
        for i, modules in enumerate(self.level_modules()):
            if i < first_level:
                continue
            for module in modules:
                x = module(x)
            if i == self.frozen_levels - 1:
                x = x.detach()
            feats.append(x)
        return feats

    def tap(self, level: int, x: Tensor) -> Tensor:
        """The feature a head reads at ``level``, from that level's output ``x (B, channels[level], h, w)``.

        Same shape as ``x``. The default is ``x`` itself (ResNet, EfficientNet: level outputs are already
        activated). A pre-activation network overrides it: its level outputs are raw residual sums that the
        next level normalises first, and heads read that normalised, rectified map (ResNet-38: PSA's
        conv4 / conv5 at levels 2 / 3). ``forward`` always returns the untapped maps, because they are what
        ``forward(f, first_level=k)`` continues from.
        """
        return x

    def freeze_levels(self, n: int) -> None:
        """Stop gradients into levels ``0..n-1`` (``n = 5``: the whole backbone); later levels train.

        Parameters of frozen levels get ``requires_grad = False`` and the output of level ``n - 1`` is
        detached, so not even activations of frozen levels are kept for backward.
        """
        if not 0 <= n <= 5:
            raise ValueError(f"freeze_levels expects 0..5, got {n}")
        self.frozen_levels = n
        for i, modules in enumerate(self.level_modules()):
            for module in modules:
                for p in module.parameters():
                    p.requires_grad_(i >= n)


@dataclass
class LoadReport:
    """Keys that did not load: model keys absent from the checkpoint, checkpoint keys the model lacks,
    and keys present in both with different shapes (``key: checkpoint shape vs model shape``)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict safely (``weights_only``) onto the CPU.

    Unwraps a top-level ``state_dict`` / ``model`` entry and strips the ``module.`` prefix that
    ``DataParallel``/DDP adds. A path ending in ``.params`` is an MXNet file: the ResNet-38 A1 ImageNet
    weights, read without MXNet and renamed to ``ResNet38``'s keys (``misc.mxnet_params``). Raises
    ``UserError`` naming ``path`` if the file is missing, unreadable or not a mapping of names to tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    if path.endswith(".params"):
        return load_mxnet_resnet38(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load fails in many ways on a file that is no checkpoint
        # torch's own message (advice to unpickle arbitrary code, reader internals) would mislead here.
        raise UserError(f"cannot read checkpoint {path}: it is not a PyTorch state dict, or it is truncated or "
                        f"corrupt ({type(e).__name__}); re-download the file or pass another one.") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _guess_architecture(keys: list[str]) -> str | None:
    """Name the backbone a state dict's keys look like, if it is one of ours."""
    if any(k.startswith("_blocks.") for k in keys):
        return "efficientnet_lite0"
    if any(k.startswith(("b4_5.", "b5_2.", "b7.conv_branch2b2")) for k in keys):
        return "resnet38"
    if "features.28.weight" in keys:
        return "vgg16"
    layer3 = [int(m.group(1)) for k in keys if (m := re.match(r"layer3\.(\d+)\.", k))]
    if layer3:
        return {5: "resnet50", 22: "resnet101"}.get(max(layer3))
    return None


def _listing(title: str, keys: list[str], limit: int = 10) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"\n  {title} ({len(keys)}): " + ", ".join(keys[:limit]) + more


def load_state(module: nn.Module, state_dict: dict[str, Tensor], *, source: str, strict: bool = True,
               ignore_prefixes: tuple[str, ...] = CLASSIFIER_PREFIXES) -> LoadReport:
    """Copy ``state_dict`` into ``module``, skipping checkpoint keys that start with ``ignore_prefixes``.

    ``num_batches_tracked`` buffers may be absent (old checkpoints lack them; fixed BN never reads
    them). With ``strict`` any missing, unexpected or shape-mismatched key raises ``UserError`` naming
    ``source`` and nothing is loaded; otherwise whatever fits is loaded and the rest reported.
    """
    own = module.state_dict()
    given = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefixes)}
    report = LoadReport(
        missing=[k for k in own if k not in given and not k.endswith("num_batches_tracked")],
        unexpected=[k for k in given if k not in own],
        mismatched=[f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in given.items()
                    if k in own and v.shape != own[k].shape],
    )
    if strict and not report.ok:
        msg = f"checkpoint {source} does not fit the {getattr(module, 'name', type(module).__name__)} model:"
        msg += _listing("missing", report.missing) if report.missing else ""
        msg += _listing("unexpected", report.unexpected) if report.unexpected else ""
        msg += _listing("shape mismatch (checkpoint vs model)", report.mismatched) if report.mismatched else ""
        guess = _guess_architecture(list(given))
        if guess is not None and guess != getattr(module, "name", guess):
            msg += f"\nThis looks like a {guess} checkpoint; use --backbone {guess}."
        else:
            msg += "\nPass a checkpoint of this architecture (or --backbone_weights none for random init)."
        raise UserError(msg)
    fitting = {k: v for k, v in given.items() if k in own and v.shape == own[k].shape}
    module.load_state_dict(fitting, strict=False)
    return report
