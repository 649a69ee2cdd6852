"""MXNet ``.params`` files without MXNet, and ResNet-38 "Model A1" names -> PSA's PyTorch names.

The ImageNet ResNet-38 (ademxapp's ``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``) only exists as an MXNet
NDArray list (spec seam_affinitynet.md 1.7). :func:`read_params` parses that container format
(``src/ndarray/ndarray.cc`` of apache/mxnet: list header, then each array in the V2, V1 or legacy layout,
then the names) and :func:`convert_mxnet_names` renames its ``arg:res4b3_branch2a_weight``-style keys to the
``b4_3.conv_branch2a.weight`` keys of ``net.resnet38.ResNet38``. :func:`load_mxnet_resnet38` does both;
``net.backbone.read_checkpoint`` calls it for any path ending in ``.params``.
"""

from __future__ import annotations

import os
import re
import struct
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from misc.errors import UserError

LIST_MAGIC = 0x112  # kMXAPINDArrayListMagic: the uint64 that starts every NDArray list file
V2_MAGIC = 0xF993FAC9  # per-array header with storage type (MXNet >= 1.0)
V1_MAGIC = 0xF993FAC8  # per-array header with int64 dims (MXNet 0.9-ish)
DENSE_STORAGE = 0
FLOAT32_FLAG = 0
# mshadow type flags, only to name a dtype this reader refuses.
_TYPE_NAMES = {0: "float32", 1: "float64", 2: "float16", 3: "uint8", 4: "int32", 5: "int8", 6: "int64", 7: "bool",
               8: "int16", 9: "uint16", 10: "uint32", 11: "uint64", 12: "bfloat16"}
# Plausibility limits: a corrupt header must give a clear error, not a giant allocation or a long loop.
_MAX_NDIM = 32
_MAX_NAME = 4096


class _Reader:
    """Little-endian reads from ``f`` that turn a short read into a ``UserError`` naming ``path``."""

    def __init__(self, f: BinaryIO, path: str) -> None:
        self.f, self.path = f, path
        self.size = os.fstat(f.fileno()).st_size

    def remaining(self) -> int:
        return self.size - self.f.tell()

    def bytes(self, n: int, what: str) -> bytearray:
        if n > self.remaining():
            raise UserError(f"{self.path} is truncated: {what} needs {n} bytes at offset {self.f.tell()}, but only "
                            f"{self.remaining()} remain; re-download the file")
        buf = bytearray(n)
        self.f.readinto(buf)
        return buf

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.bytes(struct.calcsize(fmt), what))[0]

    def corrupt(self, what: str) -> UserError:
        return UserError(f"{self.path} is not a readable MXNet .params file: {what} (offset {self.f.tell()}); "
                         "re-download it, or pass a PyTorch .pth checkpoint instead")


def _read_shape(r: _Reader, i: int, ndim: int, dim_fmt: str) -> tuple[int, ...]:
    if not 0 < ndim <= _MAX_NDIM:
        # ndim 0 is MXNet's "none" array, which never holds a parameter; larger values mean a bad header.
        raise r.corrupt(f"array {i} has {ndim} dimensions")
    shape = tuple(r.unpack(dim_fmt, f"array {i}'s shape") for _ in range(ndim))
    if any(d < 0 for d in shape):
        raise r.corrupt(f"array {i} has the shape {shape}")
    return shape


def _read_array(r: _Reader, i: int) -> Tensor:
    head = r.unpack("I", f"array {i}'s header")
    if head == V2_MAGIC:
        storage = r.unpack("i", f"array {i}'s storage type")
        if storage != DENSE_STORAGE:
            raise UserError(f"{r.path}: array {i} is sparse (storage type {storage}); only dense float32 arrays are "
                            "supported")
        shape = _read_shape(r, i, r.unpack("I", f"array {i}'s ndim"), "q")
    elif head == V1_MAGIC:
        shape = _read_shape(r, i, r.unpack("I", f"array {i}'s ndim"), "q")
    else:
        # Legacy layout (before the magic numbers): the uint32 just read is ndim, the dims are uint32.
        shape = _read_shape(r, i, head, "I")
    r.unpack("i", f"array {i}'s device type")
    r.unpack("i", f"array {i}'s device id")
    type_flag = r.unpack("i", f"array {i}'s dtype")
    if type_flag != FLOAT32_FLAG:
        name = _TYPE_NAMES.get(type_flag, f"type flag {type_flag}")
        raise UserError(f"{r.path}: array {i} has dtype {name}; this reader supports float32 parameters only "
                        "(convert the file with MXNet, or pass a PyTorch .pth checkpoint)")
    count = int(np.prod(shape, dtype=np.int64))
    buf = r.bytes(4 * count, f"array {i}'s data {shape}")
    # "<f4" then astype: correct on a big-endian host too (a no-op copy-free view on little-endian ones).
    data = np.frombuffer(buf, dtype="<f4").astype(np.float32, copy=False)
    return torch.from_numpy(data).reshape(shape)


def read_params(path: str | os.PathLike) -> dict[str, Tensor]:
    """The named float32 arrays of an MXNet ``.params`` file, in file order, as CPU tensors.

    Keys are the stored names as they are (``arg:conv1a_weight``, ``aux:bn7_moving_var``, ...). Raises
    ``UserError`` naming ``path`` for a missing file, a bad magic number, a truncated file, unnamed or
    sparse arrays, or any dtype other than float32.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        r = _Reader(f, path)
        if r.size < 16:
            raise r.corrupt(f"the file has only {r.size} bytes")
        magic = r.unpack("Q", "the list header")
        if magic != LIST_MAGIC:
            raise r.corrupt(f"bad magic number {magic:#x} (expected {LIST_MAGIC:#x})")
        r.unpack("Q", "the reserved header field")
        n_arrays = r.unpack("Q", "the array count")
        # Every array takes at least a legacy ndim, one dim, a context and a dtype, which bounds the count.
        if n_arrays * (4 + 4 + 8 + 4) > r.remaining():
            raise r.corrupt(f"{n_arrays} arrays announced in a {r.size}-byte file")
        arrays = [_read_array(r, i) for i in range(n_arrays)]
        n_names = r.unpack("Q", "the name count")
        if n_names != n_arrays:
            raise r.corrupt(f"{n_names} names for {n_arrays} arrays (a parameter file names every array)")
        names = []
        for i in range(n_names):
            length = r.unpack("Q", f"name {i}'s length")
            if length > _MAX_NAME:
                raise r.corrupt(f"name {i} claims {length} bytes")
            try:
                names.append(r.bytes(length, f"name {i}").decode("utf-8"))
            except UnicodeDecodeError as e:
                raise r.corrupt(f"name {i} is not UTF-8") from e
    if len(set(names)) != len(names):
        raise UserError(f"{path}: an array name occurs twice; the file is not a parameter dictionary")
    return dict(zip(names, arrays, strict=True))


# ``res4b3_branch2b1`` / ``bn4b3_branch2b1``: level 4, block "b3" (a = first block), layer branch2b1.
_BLOCK_KEY = re.compile(r"(res|bn)(\d)(a|b(\d+))_(branch(?:1|2a|2b\d))_(\w+)")
_BN_PARAMS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}


def _torch_name(name: str) -> str | None:
    """PSA's name for one MXNet key (without ``arg:``/``aux:``); ``''`` to drop it; ``None`` if unknown."""
    if re.fullmatch(r"linear\d+_(weight|bias)", name):
        return ""  # the ImageNet classifier (linear1000): heads are the method's business
    if name == "conv1a_weight":
        return "conv1a.weight"
    if name.startswith("bn7_") and name[4:] in _BN_PARAMS:
        return "bn7." + _BN_PARAMS[name[4:]]
    m = _BLOCK_KEY.fullmatch(name)
    if m is None:
        return None
    kind, level, _, k, layer, param = m.groups()
    block = f"b{level}" if k is None else f"b{level}_{k}"
    if kind == "res":
        return f"{block}.conv_{layer}.weight" if param == "weight" else None
    return f"{block}.bn_{layer}.{_BN_PARAMS[param]}" if param in _BN_PARAMS else None


def convert_mxnet_names(state: dict[str, Tensor], *, source: str = "the MXNet state") -> dict[str, Tensor]:
    """Rename an ademxapp ResNet-38 A1 state (``arg:``/``aux:`` + ``<layer>_<param>``) to PSA's keys.

    ``arg:res2a_branch1_weight`` -> ``b2.conv_branch1.weight``, ``aux:bn4b3_branch2b1_moving_mean`` ->
    ``b4_3.bn_branch2b1.running_mean``, ``arg:bn7_gamma`` -> ``bn7.weight`` (gamma/beta/moving_mean/moving_var
    -> weight/bias/running_mean/running_var); ``linear1000_*`` (the ImageNet classifier) is dropped. Tensors
    are passed through unchanged (same shapes: MXNet and PyTorch both store conv weights as
    ``(out, in, kh, kw)``). A name no rule covers raises ``UserError`` listing the names and ``source``.
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        name = key.split(":", 1)[1] if key.startswith(("arg:", "aux:")) else key
        new = _torch_name(name)
        if new is None:
            unknown.append(key)
        elif new:
            if new in out:
                raise UserError(f"{source}: two arrays map to {new} (the second is {key})")
            out[new] = tensor
    if unknown:
        raise UserError(f"{source}: {len(unknown)} name(s) are not ResNet-38 (ademxapp Model A1) parameters: "
                        + ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
                        + "\nOnly the ResNet-38 A1 ImageNet file (resnet38d_a1_imagenet) is read from .params.")
    return out


def load_mxnet_resnet38(path: str | os.PathLike) -> dict[str, Tensor]:
    """:func:`read_params` + :func:`convert_mxnet_names`: a ``.params`` file as a ``ResNet38`` state dict."""
    return convert_mxnet_names(read_params(path), source=os.fspath(path))
