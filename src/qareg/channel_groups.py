"""Grouped codebooks: which output channels share a codebook, and decoding indices with one.

A tensor's output channels (its first dimension) split into G groups of consecutive
channels, as equal as possible: channel c belongs to group c * G // C. Each group has its
own row of k representatives; with per-channel scales s_c (as coremltools' grouped
palettization) channel c's weights are s_c times a representative of its group's row.
G and C alone fix the groups, so a file stores the table (G, k) and the scales (C,) and
nothing else. G = 1 without scales is the plain codebook: `lookup` is then `table[indices]`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def group_count(channels: int, group_size: int) -> int:
    """Groups of at most `group_size` channels (0: one group) over `channels` channels."""
    return 1 if group_size <= 0 else max(1, math.ceil(channels / group_size))


def group_bounds(channels: int, groups: int) -> list[tuple[int, int]]:
    """(first, end) channel of each of `groups` groups over `channels` channels."""
    assert 1 <= groups <= channels, f"{groups} groups over {channels} channels"
    edges = [-(-g * channels // groups) for g in range(groups + 1)]  # ceil(g * C / G)
    return list(zip(edges[:-1], edges[1:], strict=True))


def row_offsets(channels: int, groups: int, k: int) -> Tensor:
    """(C,) int64: where each channel's group row starts in the flattened (G, k) table."""
    offsets = torch.empty(channels, dtype=torch.long)
    for g, (first, end) in enumerate(group_bounds(channels, groups)):
        offsets[first:end] = g * k
    return offsets


def channel_view(scale: Tensor, ndim: int) -> Tensor:
    """(C,) per-channel `scale` shaped to broadcast over a tensor of `ndim` dimensions."""
    return scale.reshape(-1, *([1] * (ndim - 1)))


def lookup(table: Tensor, indices: Tensor, channel_scale: Tensor | None = None) -> Tensor:
    """The values `indices` stand for: `table[indices]` for a (k,) table; for a (G, k)
    table each channel reads its group's row; then times the channel's scale, if any."""
    if table.ndim == 1:
        values = table[indices]
    else:
        offsets = row_offsets(indices.shape[0], *table.shape).to(indices.device)
        values = table.reshape(-1)[indices + channel_view(offsets, indices.ndim)]
    if channel_scale is not None:
        values = values * channel_view(channel_scale.to(values.dtype), values.ndim)
    return values
