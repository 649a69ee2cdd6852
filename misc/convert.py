"""Loading checkpoints into our networks, converting those of the reference code on the way.

:func:`load_weights` loads our own checkpoints as they are, maps those of the reference IRNet/CDA code
(``net/resnet50_cam.py``, ``net/resnet50_irn.py``) onto our ``CAMNet``/``IRN`` key layout
(:func:`convert_reference_checkpoint`), and those of PSA / SEAM's ResNet-38 networks (and CDA's released
ResNet-38 files) onto ours (:func:`convert_resnet38_checkpoint`). Weights are named by path, registry
name or URL (``misc.weights``).
"""

from __future__ import annotations

import os
import re

import torch
from torch import Tensor, nn

from misc.errors import UserError
from misc.weights import note, resolve_weights
from net.backbone import LoadReport, load_state, read_checkpoint

# Names that only the reference code (jiwoon-ahn/irn ``net/resnet50_cam.py`` / ``net/resnet50_irn.py``, used
# unchanged by suyukun666/CDA) produces; our own checkpoints never contain them.
_REFERENCE_MARKERS = ("resnet50.", "stage1.", "fc_edge", "fc_dp", "newly_added.", "edge_layers.", "dp_layers.")
# Buffers of the reference training wrapper (pair indices, displacement targets) that inference rebuilds,
# plus the statistics of a reference MeanShift variant that subclasses BatchNorm2d (only the mean is used).
_REFERENCE_DROP = re.compile(r"(path_indices\d+|disp_target|ind_from|ind_to"
                             r"|(mean_shift|fc_dp7\.4|dp_layers\.6\.4)\.(running_var|num_batches_tracked))$")


def _reference_prefixes(target: str) -> dict[str, str]:
    """Reference module prefix -> ours, for ``target`` 'cam' or 'irn'.

    The reference registers the torchvision ResNet as ``resnet50`` and again inside ``stageN`` Sequentials
    and a ``backbone`` ModuleList, so each backbone tensor is saved under up to three names; all of them
    map to our single ``backbone.<torchvision name>``. The CAM net's ``stage1`` holds conv1, bn1, relu,
    maxpool *and* layer1; the IRN's ``stage1`` stops at the max-pool and ``stage2..5`` hold layer1..4.
    """
    if target == "cam":
        stages = {"stage1.0.": "conv1.", "stage1.1.": "bn1.", "stage1.4.": "layer1.",
                  "backbone.0.0.": "conv1.", "backbone.0.1.": "bn1.", "backbone.0.4.": "layer1."}
        for k in (2, 3, 4):
            stages[f"stage{k}.0."] = stages[f"backbone.{k - 1}.0."] = f"layer{k}."
        heads = {"classifier.": "classifier.", "newly_added.0.": "classifier."}
    elif target == "irn":
        stages = {"stage1.0.": "conv1.", "stage1.1.": "bn1.", "backbone.0.0.": "conv1.", "backbone.0.1.": "bn1."}
        for k in (1, 2, 3, 4):
            stages[f"stage{k + 1}.0."] = stages[f"backbone.{k}.0."] = f"layer{k}."
        heads = {f"fc_edge{i}.": f"edge{i}." for i in range(1, 7)}
        heads |= {f"edge_layers.{i - 1}.": f"edge{i}." for i in range(1, 7)}
        heads |= {f"fc_dp{i}.": f"dp{i}." for i in range(1, 8)}
        heads |= {f"dp_layers.{i - 1}.": f"dp{i}." for i in range(1, 8)}
        # The reference appends MeanShift to fc_dp7; ours keeps it as the top-level ``mean_shift``.
        heads |= {"fc_dp7.4.": "mean_shift.", "dp_layers.6.4.": "mean_shift.", "mean_shift.": "mean_shift."}
    else:
        raise ValueError(f"target must be 'cam' or 'irn', got {target!r}")
    return {"resnet50.": "backbone."} | {k: "backbone." + v for k, v in stages.items()} | heads


# Top-level module names of PSA / SEAM's ResNet-38 networks (seam_affinitynet spec 1.3), which CDA's released
# ResNet-38 files use too. Our networks hold that backbone as ``backbone`` and keep PSA's head names
# (``net.affinitynet``, ``net.seam``), except the plain CAM network's classifier (PSA's ``fc8``).
_RESNET38_BACKBONE = re.compile(r"(conv1a|b\d(_\d)?|bn7)\.")


def is_resnet38_layout(state_dict: dict[str, Tensor]) -> bool:
    """True if the keys are those of a PSA / SEAM / CDA ResNet-38 network (backbone keys at the top level)."""
    return any(_RESNET38_BACKBONE.match(k) for k in _strip_module(state_dict))


def convert_resnet38_checkpoint(state_dict: dict[str, Tensor], own_keys: set[str]) -> dict[str, Tensor]:
    """Map a PSA / SEAM / CDA ResNet-38 state dict onto our network whose keys are ``own_keys``: backbone
    keys under ``backbone.``, ``fc8`` as ``classifier`` where the network calls it so, other heads as they
    are (a head that does not fit is then reported by the strict load)."""
    rename_fc8 = "fc8.weight" not in own_keys and "classifier.weight" in own_keys
    out = {}
    for key, tensor in _strip_module(state_dict).items():
        if _RESNET38_BACKBONE.match(key):
            key = "backbone." + key
        elif rename_fc8 and key.startswith("fc8."):
            key = "classifier." + key[len("fc8."):]
        out[key] = tensor
    return out


def is_reference_layout(state_dict: dict[str, Tensor]) -> bool:
    """True if the keys come from the reference IRNet/CDA networks (not from this code base)."""
    return any(k.startswith(_REFERENCE_MARKERS) for k in _strip_module(state_dict))


def _strip_module(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DataParallel/DDP
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    # torch.save keeps shared storages shared, so the duplicate names of a real reference checkpoint
    # usually view the same memory: compare views first, values only when they differ.
    same_view = (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                 and a.dtype == b.dtype)
    return same_view or torch.equal(a, b)


def convert_reference_checkpoint(state_dict: dict[str, Tensor], target: str, *,
                                 partial: bool = False) -> dict[str, Tensor]:
    """Map a reference IRNet/CDA state dict (``target`` 'cam' or 'irn') onto our key layout.

    Duplicate names of one tensor are merged (they must be identical), training-only index buffers are
    dropped and a DataParallel ``module.`` prefix is removed. Keys no rule maps raise ``UserError``
    listing them, unless ``partial`` (then they are skipped).
    """
    prefixes = _reference_prefixes(target)
    ordered = sorted(prefixes, key=len, reverse=True)  # most specific first: "fc_dp7.4." before "fc_dp7."
    mapped, unmatched = [], []
    for key, tensor in _strip_module(state_dict).items():
        if _REFERENCE_DROP.match(key):
            continue
        prefix = next((p for p in ordered if key.startswith(p)), None)
        if prefix is None:
            unmatched.append(key)
        else:
            mapped.append((prefixes[prefix] + key[len(prefix):], key, tensor))
    # Unmatched keys first: a checkpoint of the other network would otherwise surface as a confusing
    # "inconsistent duplicates" error (its stage numbering differs).
    if unmatched and not partial:
        other = "irn" if target == "cam" else "cam"
        hint = ""
        if any(k.startswith(tuple(p for p in _reference_prefixes(other) if p not in prefixes)) for k in unmatched):
            hint = f"\nThe keys look like a reference {other.upper()} checkpoint: use it where {other} weights go."
        raise UserError(f"{len(unmatched)} key(s) of the checkpoint have no place in our {target} network: "
                        + ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else "") + hint)
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for new, key, tensor in mapped:
        if new not in out:
            out[new], origin[new] = tensor, key
        elif not _same_tensor(out[new], tensor):
            raise UserError(f"inconsistent reference checkpoint: {origin[new]} and {key} are two names of one "
                            "tensor but hold different values")
    return out


def load_weights(model: nn.Module, spec: str | os.PathLike, target: str, *, partial: bool = False,
                 cache_dir: str | os.PathLike | None = None, offline: bool = False) -> LoadReport:
    """Load a checkpoint (path, registry name or URL) into our CAM or IRN ``model``.

    Our own checkpoints load as they are; reference IRNet/CDA ones are converted first and what was found
    is reported. Strict unless ``partial``: any missing, unexpected or mis-shaped key raises ``UserError``.
    """
    path = resolve_weights(spec, cache_dir=cache_dir, offline=offline)
    if path is None:
        raise UserError(f"{target} weights are required here, got {spec!r}")
    state = read_checkpoint(path)
    if is_reference_layout(state):
        converted = convert_reference_checkpoint(state, target, partial=partial)
        note(f"{path}: reference IRNet/CDA {target} layout, {len(state)} entries -> {len(converted)} tensors "
              "(duplicate names merged, training-only buffers dropped)")
        state = converted
    elif is_resnet38_layout(state):
        state = convert_resnet38_checkpoint(state, set(model.state_dict()))
        note(f"{path}: PSA / SEAM ResNet-38 layout, loaded into our {target} network")
    return load_state(model, state, source=str(path), strict=not partial, ignore_prefixes=())
