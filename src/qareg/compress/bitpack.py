"""Bit-packing of index streams: `bits` bits per index, little-endian, no padding between
indices; the last byte is padded with zero bits.

Index i occupies bits [i * bits, (i + 1) * bits) of the stream, bit j of a byte being
(byte >> j) & 1. Work proceeds in chunks of `CHUNK` indices (a multiple of 8, so every chunk
starts on a byte boundary), which bounds the temporary memory whatever the tensor's size.
"""

from __future__ import annotations

import numpy as np

MAX_BITS = 16
CHUNK = 1 << 20  # indices per chunk; a multiple of 8


def packed_size(count: int, bits: int) -> int:
    """Bytes holding `count` indices of `bits` bits."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    assert isinstance(bits, int) and 1 <= bits <= MAX_BITS, f"bits must be 1..16, got {bits!r}"


def pack_bits(indices: np.ndarray, bits: int) -> np.ndarray:
    """(N,) non-negative integers below 2**bits -> (packed_size(N, bits),) uint8."""
    _check_bits(bits)
    indices = np.asarray(indices).reshape(-1)
    assert indices.size == 0 or (indices.min() >= 0 and indices.max() < (1 << bits)), (
        f"indices must lie in [0, {1 << bits}), got [{indices.min()}, {indices.max()}]")
    out = np.zeros(packed_size(indices.size, bits), dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.uint32)
    for start in range(0, indices.size, CHUNK):
        chunk = indices[start:start + CHUNK].astype(np.uint32)
        if bits == 8:
            packed = chunk.astype(np.uint8)
        elif bits == 16:
            packed = chunk.astype("<u2").view(np.uint8)
        elif 8 % bits == 0:  # 1, 2, 4: whole indices per byte, no bit planes needed
            per_byte = 8 // bits
            padded = np.zeros(-(-chunk.size // per_byte) * per_byte, dtype=np.uint32)
            padded[:chunk.size] = chunk
            lanes = padded.reshape(-1, per_byte) << (bits * np.arange(per_byte, dtype=np.uint32))
            packed = np.bitwise_or.reduce(lanes, axis=1).astype(np.uint8)
        else:
            planes = ((chunk[:, None] >> shifts) & 1).astype(np.uint8)  # (m, bits), LSB first
            packed = np.packbits(planes.reshape(-1), bitorder="little")
        offset = start * bits // 8
        out[offset:offset + packed.size] = packed
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: (count,) uint16 indices. `packed` must hold exactly
    packed_size(count, bits) bytes."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    expected = packed_size(count, bits)
    if packed.size != expected:
        raise ValueError(f"{count} indices of {bits} bits take {expected} bytes, got {packed.size}")
    out = np.empty(count, dtype=np.uint16)
    weights = (1 << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    for start in range(0, count, CHUNK):
        m = min(CHUNK, count - start)
        offset = start * bits // 8
        chunk = packed[offset:offset + packed_size(m, bits)]
        if bits == 8:
            out[start:start + m] = chunk
        elif bits == 16:
            out[start:start + m] = chunk.view("<u2")
        elif 8 % bits == 0:
            shifts = (bits * np.arange(8 // bits, dtype=np.uint8))
            lanes = (chunk[:, None] >> shifts) & ((1 << bits) - 1)  # (bytes, 8 // bits)
            out[start:start + m] = lanes.reshape(-1)[:m]
        else:
            planes = np.unpackbits(chunk, bitorder="little", count=m * bits).reshape(m, bits)
            out[start:start + m] = (planes.astype(np.uint32) * weights).sum(axis=1)
    return out
