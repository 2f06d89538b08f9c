"""Size accounting of a compressed file: what each quantized tensor costs, and the whole
file split into index streams, codebooks, tensors stored as they are, and headers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from qareg.compress.bitpack import packed_size


@dataclass(frozen=True)
class StoredTensor:
    """How one quantized tensor is stored, with its real sizes."""

    name: str
    shape: tuple[int, ...]
    k: int
    bits: int  # ceil(log2 k)
    coding: str  # "packed" (bits per index) or "range" (entropy coded)
    index_bytes: int  # bytes of the index stream as stored
    codebook_bytes: int
    entropy_bytes: float  # N * H / 8, H the empirical entropy of the indices
    groups: int = 1  # rows of the codebook: one per group of output channels

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits (indices and codebook) per weight."""
        return 8 * (self.index_bytes + self.codebook_bytes) / max(1, self.numel)


@dataclass(frozen=True)
class CompressedInfo:
    """Size accounting of one compressed file, from its real bytes."""

    file_bytes: int
    float32_bytes: int  # the float32 state dict saved with safetensors, measured at save time
    raw_bytes: int  # tensors stored as they are (biases, batch norm)
    raw_values: int
    tensors: tuple[StoredTensor, ...]
    model: dict[str, Any] | None  # registry name and constructor arguments
    qareg_version: str
    meta: dict[str, Any]  # how the model was made: config, seed, git commit...

    @property
    def quantized_weights(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def compression_ratio(self) -> float:
        return self.float32_bytes / self.file_bytes

    @property
    def index_bytes(self) -> int:
        """Bytes of the quantized tensors' index streams."""
        return sum(t.index_bytes for t in self.tensors)

    @property
    def codebook_bytes(self) -> int:
        """Bytes of the quantized tensors' codebooks."""
        return sum(t.codebook_bytes for t in self.tensors)

    @property
    def header_bytes(self) -> int:
        """Bytes of everything but tensor data: the headers and the container's framing."""
        return self.file_bytes - self.index_bytes - self.codebook_bytes - self.raw_bytes

    @property
    def stored_bits_per_weight(self) -> float:
        """8 x the whole file's bytes per quantized weight: what a weight costs on disk."""
        return 8 * self.file_bytes / max(1, self.quantized_weights)

    @property
    def bits_per_weight(self) -> float:
        """Bits of indices and codebooks per quantized weight."""
        stored = sum(t.index_bytes + t.codebook_bytes for t in self.tensors)
        return 8 * stored / max(1, self.quantized_weights)

    @property
    def bits_per_parameter(self) -> float:
        """Bits of the whole file per stored value (quantized weights and raw values)."""
        return 8 * self.file_bytes / max(1, self.quantized_weights + self.raw_values)

    @property
    def ideal_bytes(self) -> float:
        """N * ceil(log2 k) / 8 per quantized tensor plus its codebook, plus raw tensors."""
        return self.raw_bytes + sum(packed_size(t.numel, t.bits) + t.codebook_bytes
                                    for t in self.tensors)

    def format_table(self) -> str:
        header = (f"{'tensor':<28} {'shape':<16} {'k':>8} {'coding':<7} {'index B':>10} "
                  f"{'entropy B':>10} {'codebook B':>10} {'bits/w':>7}")
        lines = [header, "-" * len(header)]
        for t in self.tensors:
            shape = "x".join(map(str, t.shape))
            k = f"{t.k}x{t.groups}" if t.groups > 1 else str(t.k)  # k per row x rows
            lines.append(f"{t.name:<28} {shape:<16} {k:>8} {t.coding:<7} {t.index_bytes:>10} "
                         f"{t.entropy_bytes:>10.0f} {t.codebook_bytes:>10} "
                         f"{t.bits_per_weight:>7.3f}")
        lines += [
            "-" * len(header),
            f"quantized: {self.quantized_weights} weights, {self.bits_per_weight:.3f} bits/weight",
            f"raw: {self.raw_values} values in {self.raw_bytes} bytes",
            f"file: {self.file_bytes} bytes, {self.bits_per_parameter:.3f} bits/parameter; "
            f"float32 safetensors: {self.float32_bytes} bytes; "
            f"compression ratio {self.compression_ratio:.2f}x",
        ]
        return "\n".join(lines)


@dataclass
class FileContents:
    """What a compressed file holds, read and checked, before any index is decoded: the
    same for every format version."""

    model: dict[str, Any] | None
    qareg_version: str
    meta: dict[str, Any]
    float32_bytes: int
    # per quantized tensor: name, shape, dtype, k, bits, coding, groups (rows of its codebook)
    entries: list[dict[str, Any]]
    codebooks: dict[str, Tensor] = field(default_factory=dict)  # (k,) or (G, k), by name
    channel_scales: dict[str, Tensor] = field(default_factory=dict)  # (C,), where present
    streams: dict[str, Tensor] = field(default_factory=dict)  # uint8 index streams, by name
    raw: dict[str, Tensor] = field(default_factory=dict)  # tensors stored as they are

    def codebook_bytes(self, name: str) -> int:
        """Bytes of tensor `name`'s codebook, its channel scales included."""
        scales = self.channel_scales.get(name)
        return self.codebooks[name].nbytes + (0 if scales is None else scales.nbytes)

    def info(self, file_bytes: int) -> CompressedInfo:
        """The size accounting of a file of `file_bytes` with these contents."""
        stored = tuple(
            StoredTensor(name=e["name"], shape=tuple(e["shape"]), k=e["k"], bits=e["bits"],
                         coding=e["coding"], index_bytes=self.streams[e["name"]].numel(),
                         codebook_bytes=self.codebook_bytes(e["name"]),
                         entropy_bytes=e["entropy_bytes"], groups=e.get("groups", 1))
            for e in self.entries
        )
        return CompressedInfo(
            file_bytes=file_bytes, float32_bytes=self.float32_bytes,
            raw_bytes=sum(t.nbytes for t in self.raw.values()),
            raw_values=sum(t.numel() for t in self.raw.values()),
            tensors=stored, model=self.model, qareg_version=self.qareg_version, meta=self.meta,
        )
