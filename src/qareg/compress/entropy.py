"""Entropy coding of index streams with a static range coder (the `constriction` library).

A stream is the symbol counts, then the coder's compressed words:
`[k x uint32 counts][uint32 words]`, little-endian. The counts define the categorical model
shared by encoder and decoder, so the indices cost about their empirical entropy
(N * H bits), plus 4k bytes of counts and a word or two of coder overhead.
"""

from __future__ import annotations

import numpy as np


def empirical_entropy_bytes(indices: np.ndarray, k: int) -> float:
    """N * H / 8: the bytes an ideal coder needs for `indices` under their own frequencies."""
    counts = np.bincount(np.asarray(indices).reshape(-1), minlength=k).astype(np.float64)
    total = counts.sum()
    p = counts[counts > 0] / total
    return float(-(counts[counts > 0] * np.log2(p)).sum() / 8)


def _model(counts: np.ndarray):
    import constriction

    # Symbols that never occur still get the coder's smallest probability, on both sides.
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def range_encode(indices: np.ndarray, k: int) -> np.ndarray:
    """(N,) indices in [0, k) -> the stream as (bytes,) uint8."""
    import constriction

    indices = np.asarray(indices).reshape(-1)
    assert indices.size < 2**32, f"at most 2**32 - 1 indices per stream, got {indices.size}"
    counts = np.bincount(indices, minlength=k).astype("<u4")
    assert counts.size == k, f"indices must lie in [0, {k}), max is {indices.max()}"
    encoder = constriction.stream.queue.RangeEncoder()
    if indices.size:
        encoder.encode(indices.astype(np.int32), _model(counts))
    words = encoder.get_compressed().astype("<u4")
    return np.concatenate([counts.view(np.uint8), words.view(np.uint8)])


def range_decode(stream: np.ndarray, k: int, count: int) -> np.ndarray:
    """Inverse of `range_encode`: (count,) uint16 indices. Raises ValueError on a stream
    that cannot be one of `count` indices in [0, k)."""
    import constriction

    stream = np.asarray(stream, dtype=np.uint8).reshape(-1)
    if stream.size < 4 * k or (stream.size - 4 * k) % 4:
        raise ValueError(f"a range-coded stream for k={k} has 4*k bytes of counts and whole "
                         f"32-bit words; got {stream.size} bytes")
    counts = stream[:4 * k].view("<u4")
    if int(counts.sum(dtype=np.uint64)) != count:
        raise ValueError(f"the stream's counts add up to {int(counts.sum(dtype=np.uint64))}, "
                         f"not to the tensor's {count} entries")
    if count == 0:
        return np.empty(0, dtype=np.uint16)
    words = stream[4 * k:].view("<u4").astype(np.uint32)
    try:
        decoded = constriction.stream.queue.RangeDecoder(words).decode(_model(counts), count)
    except Exception as error:  # the library raises several types on malformed data
        raise ValueError(f"range decoding failed: {error}") from None
    decoded = np.asarray(decoded)
    if decoded.min() < 0 or decoded.max() >= k:
        raise ValueError(f"decoded indices outside [0, {k})")
    return decoded.astype(np.uint16)
