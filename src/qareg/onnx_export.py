"""ONNX export of a compressed file: every quantized weight stays a codebook plus integer
indices, rebuilt at run time by `Cast` and `Gather`; everything else as it is.

The network is traced with torch.fx and each node mapped to standard ONNX operators
(Conv, Gemm, BatchNormalization, Relu, MaxPool, AveragePool, GlobalAveragePool, Flatten,
Add, Identity); a layer or function outside that list is refused, naming it. Indices of
k <= 16 are packed 1, 2 or 4 to a byte (as qareg's own bit-packing) and unpacked with
standard operators (BitShift, BitwiseAnd, Reshape, Slice); larger k are stored as uint8 or
uint16. Any runtime that reads ONNX runs the file (ONNX Runtime is tested).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qareg.act_quant import NAME as INPUT_QUANTIZER
from qareg.act_quant import InputQuantizer, apply_input_quantizer
from qareg.channel_groups import channel_view, row_offsets
from qareg.checkpoint import atomic_write
from qareg.compress.io import decode_indices, load_compressed, read_contents
from qareg.errors import ConfigError

OPSET = 21
INPUT, OUTPUT = "images", "logits"


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install onnx") from None
    return onnx


def _pair(value: Any) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


class GraphBuilder:
    """Collects ONNX nodes and initializers while walking a traced network."""

    def __init__(self, indices: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.onnx = _onnx()
        # weight name -> (codebook (k,) or (G, k) float32, indices int, channel scales or None)
        self.indices = indices
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0
        self.built: set[str] = set()  # parameters already in the graph

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def node(self, op: str, inputs: list[str], hint: str, **attributes: Any) -> str:
        out = self.fresh(hint)
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out, **attributes))
        return out

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def shared(self, name: str, array: np.ndarray) -> str:
        """A constant used by several weights, added once."""
        if not any(t.name == name for t in self.initializers):
            self.constant(name, array)
        return name

    def packed_indices(self, name: str, index: np.ndarray, bits: int) -> str:
        """Indices stored `bits` (1, 2 or 4) to a byte, unpacked by shifts and masks into
        an int32 tensor of the weight's shape."""
        lanes = 8 // bits
        flat = index.reshape(-1).astype(np.uint8)
        flat = np.concatenate([flat, np.zeros(-flat.size % lanes, np.uint8)]).reshape(-1, lanes)
        packed = np.bitwise_or.reduce(flat << (bits * np.arange(lanes, dtype=np.uint8)), axis=1)
        stored = self.constant(f"{name}.indices", packed.astype(np.uint8))
        shifts = self.shared(f"qareg.shifts{bits}",
                             (bits * np.arange(lanes, dtype=np.uint8)).reshape(1, lanes))
        mask = self.shared(f"qareg.mask{bits}", np.array((1 << bits) - 1, np.uint8))
        column = self.node("Unsqueeze", [stored, self.shared("qareg.axis1",
                                                             np.array([1], np.int64))], name)
        shifted = self.node("BitShift", [column, shifts], name, direction="RIGHT")
        masked = self.node("BitwiseAnd", [shifted, mask], name)
        flat_all = self.node("Reshape", [masked, self.shared("qareg.flat",
                                                             np.array([-1], np.int64))], name)
        count = self.constant(f"{name}.count", np.array([index.size], np.int64))
        cut = self.node("Slice", [flat_all, self.shared("qareg.zero", np.array([0], np.int64)),
                                  count], name)
        shaped = self.node("Reshape", [cut, self.constant(f"{name}.shape", np.array(
            index.shape, np.int64))], name)
        return self.node("Cast", [shaped], f"{name}.index", to=self.onnx.TensorProto.INT32)

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        """The ONNX value of parameter `name`: a Gather over its codebook if quantized;
        built once, however many times its module is called."""
        if name in self.built:
            return name
        self.built.add(name)
        if name not in self.indices:
            return self.constant(name, tensor.detach().cpu().float().numpy())
        codebook, index, scales = self.indices[name]
        k = codebook.shape[-1]
        self.constant(f"{name}.codebook", codebook.reshape(-1).astype(np.float32))
        if k <= 16:
            wide = self.packed_indices(name, index, 1 if k <= 2 else 2 if k <= 4 else 4)
        else:
            stored = self.constant(f"{name}.indices",
                                   index.astype(np.uint8 if k <= 256 else np.uint16))
            wide = self.node("Cast", [stored], f"{name}.index", to=self.onnx.TensorProto.INT32)
        if codebook.ndim == 2:  # grouped: each channel reads its group's row of the table
            offsets = row_offsets(index.shape[0], *codebook.shape)
            wide = self.node("Add", [wide, self.constant(f"{name}.offsets", channel_view(
                offsets, index.ndim).numpy().astype(np.int32))], f"{name}.row")
        gathered = name if scales is None else f"{name}.unscaled"
        self.nodes.append(self.onnx.helper.make_node(
            "Gather", [f"{name}.codebook", wide], [gathered], name=gathered, axis=0))
        if scales is not None:
            self.nodes.append(self.onnx.helper.make_node("Mul", [gathered, self.constant(
                f"{name}.channel_scale", channel_view(torch.from_numpy(scales), index.ndim)
                .numpy().astype(np.float32))], [name], name=name))
        return name

    def parameters(self, prefix: str, module: nn.Module, names: tuple[str, ...]) -> list[str]:
        return [self.weight(f"{prefix}.{n}" if prefix else n, getattr(module, n))
                for n in names if getattr(module, n, None) is not None]


def _conv(b: GraphBuilder, prefix: str, m: nn.Conv2d, x: str) -> str:
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        raise ConfigError(f"layer {prefix!r}: Conv2d with padding {m.padding!r} and mode "
                          f"{m.padding_mode!r} is not supported; use integer zero padding")
    pad = _pair(m.padding)
    return b.node("Conv", [x, *b.parameters(prefix, m, ("weight", "bias"))], prefix,
                  kernel_shape=_pair(m.kernel_size), strides=_pair(m.stride), pads=pad + pad,
                  dilations=_pair(m.dilation), group=m.groups)


def _linear(b: GraphBuilder, prefix: str, m: nn.Linear, x: str) -> str:
    return b.node("Gemm", [x, *b.parameters(prefix, m, ("weight", "bias"))], prefix, transB=1)


def _batch_norm(b: GraphBuilder, prefix: str, m: nn.modules.batchnorm._BatchNorm, x: str) -> str:
    if not (m.affine and m.track_running_stats):
        raise ConfigError(f"layer {prefix!r}: batch norm without affine or running statistics "
                          "is not supported")
    inputs = b.parameters(prefix, m, ("weight", "bias", "running_mean", "running_var"))
    return b.node("BatchNormalization", [x, *inputs], prefix, epsilon=m.eps)


def _window(m: nn.MaxPool2d | nn.AvgPool2d) -> dict[str, Any]:
    """The ONNX attributes of a pooling window (stride None means the kernel size)."""
    pad = _pair(m.padding)
    return {"kernel_shape": _pair(m.kernel_size), "strides": _pair(m.stride or m.kernel_size),
            "pads": pad + pad, "ceil_mode": int(m.ceil_mode)}


def _max_pool(b: GraphBuilder, prefix: str, m: nn.MaxPool2d, x: str) -> str:
    if m.return_indices:
        raise ConfigError(f"layer {prefix!r}: MaxPool2d(return_indices=True) is not supported")
    return b.node("MaxPool", [x], prefix, dilations=_pair(m.dilation), **_window(m))


def _avg_pool(b: GraphBuilder, prefix: str, m: nn.AvgPool2d, x: str) -> str:
    if m.divisor_override is not None:
        raise ConfigError(f"layer {prefix!r}: AvgPool2d(divisor_override=...) is not supported")
    return b.node("AveragePool", [x], prefix, count_include_pad=int(m.count_include_pad),
                  **_window(m))


def _adaptive_avg_pool(b: GraphBuilder, prefix: str, m: nn.AdaptiveAvgPool2d, x: str) -> str:
    if _pair(m.output_size) != [1, 1]:
        raise ConfigError(f"layer {prefix!r}: AdaptiveAvgPool2d({m.output_size}) is not "
                          "supported; only output size 1 (global average pooling)")
    return b.node("GlobalAveragePool", [x], prefix)


def _flatten(b: GraphBuilder, prefix: str, m: nn.Flatten, x: str) -> str:
    if m.end_dim != -1:
        raise ConfigError(f"layer {prefix!r}: Flatten(end_dim={m.end_dim}) is not supported")
    return b.node("Flatten", [x], prefix, axis=m.start_dim)


MODULES: dict[type, Callable[[GraphBuilder, str, Any, str], str]] = {
    nn.Conv2d: _conv, nn.Linear: _linear, nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm1d: _batch_norm, nn.MaxPool2d: _max_pool, nn.AvgPool2d: _avg_pool,
    nn.AdaptiveAvgPool2d: _adaptive_avg_pool, nn.Flatten: _flatten,
    nn.ReLU: lambda b, p, m, x: b.node("Relu", [x], p),
    nn.Dropout: lambda b, p, m, x: b.node("Identity", [x], p),
    nn.Identity: lambda b, p, m, x: b.node("Identity", [x], p),
}


def _quantized_input(b: GraphBuilder, prefix: str, module: nn.Module, x: str) -> str:
    """`x` through the layer's input quantizer, if it has one (`qareg.act_quant`), as
    round(clip(x / step, qmin, qmax)) * step: the ops of its forward pass, Round halving to
    even like torch's. Any other hook on the layer would be lost by the trace: refused."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    quantizer = getattr(module, INPUT_QUANTIZER, None)
    others = [h for h in hooks if h is not apply_input_quantizer]
    if others:
        names = ", ".join(getattr(h, "__name__", type(h).__name__) for h in others)
        raise ConfigError(f"ONNX export: layer {prefix!r} has forward hooks ({names}) that an "
                          "ONNX graph cannot carry; remove them before exporting")
    if quantizer is None:
        return x
    if type(quantizer) is not InputQuantizer:  # CPQ's mode rule has no standard op
        raise ConfigError(f"ONNX export: layer {prefix!r} has an input quantizer of type "
                          f"{type(quantizer).__name__}, which is not supported; supported: "
                          "InputQuantizer (the learned-step one)")
    qmin, qmax = quantizer.levels()
    step = b.constant(f"{prefix}.input_step", quantizer.effective_step().numpy())
    low = b.constant(f"{prefix}.input_min", np.array(qmin, np.float32))
    high = b.constant(f"{prefix}.input_max", np.array(qmax, np.float32))
    scaled = b.node("Div", [x, step], f"{prefix}.input_scaled")
    rounded = b.node("Round", [b.node("Clip", [scaled, low, high], f"{prefix}.input_clip")],
                     f"{prefix}.input_round")
    return b.node("Mul", [rounded, step], f"{prefix}.input_quantized")


def _function(b: GraphBuilder, node: Any, args: list[Any]) -> str:
    target = node.target
    if target in (torch.relu, nn.functional.relu, "relu"):
        return b.node("Relu", [args[0]], "relu")
    if target in (operator.add, torch.add, "add") and len(args) == 2 and all(
            isinstance(a, str) for a in args):
        return b.node("Add", args, "add")
    if target in (torch.flatten, "flatten") and node.kwargs.get("end_dim", -1) == -1 and (
            len(args) < 3 or args[2] == -1):
        return b.node("Flatten", [args[0]], "flatten",
                      axis=args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0))
    name = getattr(target, "__name__", str(target))
    raise ConfigError(f"ONNX export: the operation {name!r} (node {node.name!r}) is not "
                      "supported; supported layers: " + ", ".join(t.__name__ for t in MODULES)
                      + "; functions: relu, add, flatten")


def build_model(model: nn.Module, indices: dict[str, tuple[np.ndarray, np.ndarray]],
                input_shape: tuple[int, int, int]) -> Any:
    """The ONNX ModelProto of `model` (eval mode) on inputs (batch, *input_shape), the
    weights named in `indices` as codebook + indices."""
    onnx = _onnx()
    with torch.no_grad():
        output_shape = list(model.eval()(torch.zeros(1, *input_shape)).shape[1:])
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as error:  # tracing errors of all kinds
        raise ConfigError(f"ONNX export: torch.fx cannot trace the model: {error}") from None
    builder, values = GraphBuilder(indices), {}
    modules = dict(traced.named_modules())
    for node in traced.graph.nodes:
        args = [values.get(a, a) for a in node.args]
        if node.op == "placeholder":
            values[node] = INPUT
        elif node.op == "call_module":
            module = modules[node.target]
            convert = MODULES.get(type(module))
            if convert is None:
                raise ConfigError(f"ONNX export: layer {node.target!r} is a "
                                  f"{type(module).__name__}, which is not supported; "
                                  f"supported: {', '.join(t.__name__ for t in MODULES)}")
            x = _quantized_input(builder, node.target, module, args[0])
            values[node] = convert(builder, node.target, module, x)
        elif node.op in ("call_function", "call_method"):
            values[node] = _function(builder, node, args)
        elif node.op == "output":
            builder.nodes.append(onnx.helper.make_node("Identity", [args[0]], [OUTPUT]))
        else:
            raise ConfigError(f"ONNX export: node {node.name!r} ({node.op}) is not supported")
    graph = onnx.helper.make_graph(
        builder.nodes, "qareg",
        [onnx.helper.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT,
                                            ["batch", *input_shape])],
        [onnx.helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT,
                                            ["batch", *output_shape])],
        builder.initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="qareg")
    onnx.checker.check_model(proto)
    return proto


def onnx_model(path: str | Path, *, model: nn.Module | None = None,
               input_shape: tuple[int, int, int] | None = None, quantized: bool = True) -> Any:
    """The ONNX ModelProto of compressed file `path`; `quantized=False` gives every weight as
    float32 (the reference). `input_shape` (channels, height, width) defaults to what the
    file records; `model` is for networks outside the registry (as in load_compressed)."""
    path = Path(path)
    contents, _ = read_contents(path)
    dense = load_compressed(path, model=model).eval()
    if input_shape is None:
        spec = contents.model or {}
        if "in_channels" not in spec or "input_size" not in spec:
            raise ConfigError(f"{str(path)!r} records no input shape: give input_shape "
                              "(channels, height, width)")
        input_shape = (spec["in_channels"], spec["input_size"], spec["input_size"])
    indices = {}
    if quantized:
        for e in contents.entries:
            index = decode_indices(path, e, contents.streams[e["name"]]).numpy()
            scales = contents.channel_scales.get(e["name"])
            indices[e["name"]] = (contents.codebooks[e["name"]].float().numpy(), index,
                                  None if scales is None else scales.float().numpy())
    return build_model(dense, indices, tuple(input_shape))


@dataclass(frozen=True)
class ExportedSizes:
    """What an export wrote, beside what it came from."""

    compressed_bytes: int  # the .qz file
    onnx_bytes: int  # the ONNX file written, codebooks and indices
    float32_onnx_bytes: int  # the same network in ONNX with float32 weights (not written)


def export_onnx(path: str | Path, out: str | Path, *, model: nn.Module | None = None,
                input_shape: tuple[int, int, int] | None = None) -> ExportedSizes:
    """Write the network of compressed file `path` as ONNX to `out`, atomically: a bad file
    or an unsupported layer raises before anything is written."""
    data = onnx_model(path, model=model, input_shape=input_shape).SerializeToString()
    reference = onnx_model(path, model=model, input_shape=input_shape, quantized=False)
    atomic_write(out, lambda f: f.write(data))
    return ExportedSizes(Path(path).stat().st_size, len(data), reference.ByteSize())
