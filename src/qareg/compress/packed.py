"""Packed inference: quantized weights kept in memory as the file stores them (the index
stream, bit-packed or range coded, plus the codebook), decoded layer by layer inside the
forward pass and dropped once the layer has run.

The weights then hold about what the file's index streams and codebooks take, instead of
32 bits per weight; the price is decoding each layer's indices on every forward pass
(`benchmarks/deploy_latency.py` measures it). The decoded weight is `codebook[indices]`,
the very tensor a dense load holds, so outputs are bit-identical.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qareg.channel_groups import lookup
from qareg.compress.bitpack import unpack_bits
from qareg.compress.entropy import range_decode

PACKED_SUFFIX = "_packed"  # the submodule `weight_packed` holds `weight`'s packed form


class PackedWeight(nn.Module):
    """One quantized weight as an index stream and a codebook (both buffers, so that
    `.to(device)` moves them); `decode()` rebuilds the dense tensor."""

    def __init__(self, stream: Tensor, codebook: Tensor, entry: dict[str, Any],
                 dtype: torch.dtype, channel_scale: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("stream", stream.contiguous())
        self.register_buffer("codebook", codebook.to(dtype))  # (k,), or (G, k) grouped
        self.register_buffer("channel_scale", None if channel_scale is None
                             else channel_scale.to(dtype))
        self.shape = tuple(entry["shape"])
        self.k, self.bits, self.coding = entry["k"], entry["bits"], entry["coding"]

    def held_bytes(self) -> int:
        """Bytes this weight keeps in memory between forward passes."""
        scales = 0 if self.channel_scale is None else self.channel_scale.nbytes
        return self.stream.nbytes + self.codebook.nbytes + scales

    def decode(self) -> Tensor:
        """The dense weight, `codebook[indices]` (per group and channel scale when grouped:
        `qareg.channel_groups.lookup`), on the codebook's device."""
        stream, count = self.stream.cpu().numpy(), math.prod(self.shape)
        if self.coding == "packed":
            indices = unpack_bits(stream, self.bits, count)
        else:
            indices = range_decode(stream, self.k, count)
        index = torch.from_numpy(indices.astype(np.int64)).to(self.codebook.device)
        return lookup(self.codebook, index.reshape(self.shape), self.channel_scale)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, k={self.k}, coding={self.coding}, "
                f"bytes={self.held_bytes()}")


def _decode_before(attribute: str):
    def hook(module: nn.Module, args: tuple) -> None:
        module.__dict__[attribute] = getattr(module, attribute + PACKED_SUFFIX).decode()
    return hook


def _drop_after(attribute: str):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        module.__dict__.pop(attribute, None)
    return hook


def attach_packed(model: nn.Module, name: str, packed: PackedWeight) -> None:
    """Replace parameter `name` (e.g. "features.0.weight") of `model` by `packed`, decoded
    for each forward pass of its module and dropped after it."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    del module._parameters[attribute]
    module.add_module(attribute + PACKED_SUFFIX, packed)
    module.register_forward_pre_hook(_decode_before(attribute))
    module.register_forward_hook(_drop_after(attribute))


def packed_weights(model: nn.Module) -> list[PackedWeight]:
    """Every packed weight of `model`."""
    return [m for m in model.modules() if isinstance(m, PackedWeight)]
