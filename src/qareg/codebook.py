"""The learnable per-tensor codebook.

A `Codebook` holds k representatives for one weight tensor as an `nn.Parameter`, so the
optimiser, `state_dict()` and DistributedDataParallel see it like any other parameter.

Representatives are stored in units of the tensor's scale (its root mean square when the
codebook was made): `representatives = normalized * scale`. Gradients and optimiser steps
then act on numbers of order one in every layer, so one learning rate suits a first conv
with weights near 0.3 and a wide linear layer with weights near 0.01.

Sorted and distinct, always: `project_()` sorts the representatives and pushes each one at
least `MIN_GAP` (in scale units, more for very large ones) above its predecessor.
`qareg.penalty` and `qareg.convert` call it before every use, so whatever an optimiser
step did, representatives are never used out of order and never collapse onto one value.

A codebook made with `zero=True` pins one representative at exactly 0 (the one nearest to
0, set to 0 by every `project_()`): weights snapped to it are exact zeros, which prunes
them and skews index usage toward one value that the range coder stores cheaply.

Grouped (`qareg.channel_groups`): a codebook made with `groups` > 1 holds one row of k
representatives per group of output channels, `normalized` then being (G, k); one made with
`channels` keeps a fixed per-channel scale s_c (each channel's RMS at fit), and channel c's
weights are s_c times a representative. Both cost bytes in the file (G * k values, C
scales) and buy a closer fit for layers whose channels differ in range. `assign`,
`dequantize` and `split` hide the difference from callers; a plain codebook (one group, no
scales) is exactly the codebook above.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qareg.channel_groups import channel_view, group_bounds, lookup
from qareg.cluster1d import initial_representatives
from qareg.nearest import assign

# Smallest distance between neighbouring representatives, in units of the tensor's scale.
MIN_GAP = 1e-5


def rms_scale(values: Tensor) -> float:
    """Root mean square of `values`, or 1.0 when they are all zero."""
    rms = values.detach().double().square().mean().sqrt().item()
    return rms if rms > 0 else 1.0


def channel_rms(values: Tensor) -> Tensor:
    """(C,) root mean square of each output channel (first dimension) of `values`, 1.0 for a
    channel that is all zero."""
    rms = values.detach().double().reshape(values.shape[0], -1).square().mean(1).sqrt()
    return torch.where(rms > 0, rms, torch.ones_like(rms)).float()


def _projected(row: Tensor, zero: bool) -> Tensor:
    """`row` (k,) sorted, with gaps of at least MIN_GAP (more for large values), one value
    pinned at 0 when `zero`: `Codebook.project_` for one row."""
    ordered = row.double().sort().values
    gap = MIN_GAP * ordered.abs().max().clamp(min=1.0)
    if not zero:
        return _spread_up(ordered, gap)
    j = int(ordered.abs().argmin())  # pinned: 0, the others spread away from it
    ordered[j] = 0.0
    above = _spread_up(ordered[j:], gap)
    below = -_spread_up(-ordered[:j + 1].flip(0), gap).flip(0)
    return torch.cat([below[:-1], above])


def _spread_up(ordered: Tensor, gap: Tensor) -> Tensor:
    """Sorted `ordered` with each value at least `gap` above the previous one, moving each
    only up and only as far as needed (the first stays put)."""
    steps = torch.arange(ordered.numel(), device=ordered.device, dtype=torch.float64) * gap
    return torch.cummax(ordered - steps, dim=0).values + steps


class Codebook(nn.Module):
    """k learnable representatives for one tensor, kept sorted and distinct."""

    def __init__(self, k: int, scale: float = 1.0, zero: bool = False, groups: int = 1,
                 channels: int = 0) -> None:
        super().__init__()
        assert k >= 2 and groups >= 1, f"a codebook needs k >= 2 and groups >= 1, got {k}, {groups}"
        self.zero = zero  # one representative pinned at exactly 0 (set again by prepare)
        # (k,) representatives divided by `scale`, or (G, k) when grouped; the learnable part.
        start = torch.arange(k, dtype=torch.float32)
        self.normalized = nn.Parameter(start if groups == 1 else start.repeat(groups, 1))
        # Scale of the tensor when the codebook was made (its RMS); fixed, not learned.
        self.register_buffer("scale", torch.tensor(float(scale)))
        # (C,) fixed per-channel scales, or None: weights are channel_scale[c] * a value
        self.register_buffer("channel_scale", torch.ones(channels) if channels else None)
        # (k - 1,) float64 boundaries between representatives in units of `scale`, set while
        # training under a size budget (an entropy-constrained assignment, `qareg.budget`);
        # None: the nearest rule's midpoints. Not saved: training sets them again.
        self.cuts: Tensor | None = None
        self.project_()

    @classmethod
    def fit(
        cls, values: Tensor, k: int, init: str = "kmeans-exact",
        generator: torch.Generator | None = None, zero: bool = False, groups: int = 1,
        channel_scale: bool = False,
    ) -> Codebook:
        """A codebook for `values`, initialised by one of `qareg.cluster1d.INITS` (with
        `zero`, the representative nearest to 0 then moved to 0); with `groups` > 1 one row
        per group of output channels, each fitted to its group; with `channel_scale`, fitted
        to the values divided by their channel's RMS."""
        channels = values.shape[0] if channel_scale else 0
        codebook = cls(k, 1.0, zero, groups, channels)
        if channel_scale:
            codebook.channel_scale.copy_(channel_rms(values).to(codebook.channel_scale))
        normalized = codebook.normalize(values.detach())
        scale = rms_scale(normalized)
        codebook.scale.fill_(scale)
        rows = [initial_representatives(part, k, init, generator) / scale
                for part in codebook.split(normalized)]
        with torch.no_grad():
            codebook.normalized.copy_(torch.stack(rows).reshape(codebook.normalized.shape)
                                      .float())
        codebook.project_()
        return codebook.to(values.device)

    @property
    def k(self) -> int:
        return self.normalized.shape[-1]

    @property
    def groups(self) -> int:
        """Rows of representatives: one per group of output channels."""
        return 1 if self.normalized.ndim == 1 else self.normalized.shape[0]

    @property
    def plain(self) -> bool:
        """One row of representatives and no per-channel scales."""
        return self.groups == 1 and self.channel_scale is None

    @property
    def bits(self) -> int:
        """Bits per index: ceil(log2 k)."""
        return max(1, math.ceil(math.log2(self.k)))

    def representatives(self) -> Tensor:
        """(k,) representatives in the tensor's units, or (G, k) when grouped, in units of
        the channel scales when it has them; differentiable."""
        return self.normalized * self.scale

    def boundaries(self, dtype: torch.dtype) -> Tensor | None:
        """The assignment's boundaries in the tensor's units and `dtype` where `cuts` are
        set (plain codebooks only); None: the nearest rule."""
        if self.cuts is None:
            return None
        assert self.plain and self.cuts.numel() == self.k - 1, (
            f"cuts of {self.cuts.numel()} values for a codebook of k={self.k}, plain: "
            f"{self.plain}")
        return (self.cuts.double() * self.scale.double().cpu()).to(dtype)

    def normalize(self, values: Tensor) -> Tensor:
        """`values` divided by their channel's scale (as they are without channel scales);
        differentiable."""
        if self.channel_scale is None:
            return values
        return values / channel_view(self.channel_scale.to(values), values.ndim)

    def split(self, values: Tensor) -> list[Tensor]:
        """`values` (the tensor's shape) as one part per group of output channels."""
        if self.groups == 1:
            return [values]
        return [values[first:end] for first, end in group_bounds(values.shape[0], self.groups)]

    def parts(self, values: Tensor) -> list[tuple[Tensor, Tensor, float]]:
        """(normalized part, its representatives, its share of the entries) per group: what
        a per-tensor function (penalty, rate) sees of a grouped codebook."""
        table = self.representatives().reshape(self.groups, self.k)
        parts = self.split(self.normalize(values))
        return [(part, row, part.numel() / max(1, values.numel()))
                for part, row in zip(parts, table, strict=True)]

    @torch.no_grad()
    def project_(self) -> None:
        """Sort and enforce gaps of at least MIN_GAP: c_i >= c_(i-1) + MIN_GAP.

        Sorting then a running maximum of c_i - i * gap moves each representative up only
        as far as needed; representatives already in order with room between them stay put.
        The gap grows with the largest |c| so that it stays many float32 steps wide.
        """
        if self.groups == 1:
            self.normalized.copy_(_projected(self.normalized, self.zero))
            return
        for row in self.normalized:
            row.copy_(_projected(row, self.zero))

    def assign(self, values: Tensor) -> Tensor:
        """Index of the nearest representative for every value of `values` (the rule of
        `qareg.nearest`; per group, in channel-scale units, when grouped)."""
        if self.plain:
            return assign(values, self.representatives(), self.boundaries(values.dtype))
        table = self.representatives().detach().reshape(self.groups, self.k)
        parts = self.split(self.normalize(values.detach()))
        return torch.cat([assign(part, row.to(part))
                          for part, row in zip(parts, table, strict=True)])

    def dequantize(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The values `indices` (the tensor's shape) stand for, in `dtype`, exactly as a
        compressed file decodes them (`qareg.channel_groups.lookup`); no gradient."""
        with torch.no_grad():
            scales = None if self.channel_scale is None else self.channel_scale.to(dtype)
            return lookup(self.representatives().to(dtype), indices, scales)

    def quantize(self, values: Tensor) -> Tensor:
        """`values` with each entry replaced by its nearest representative (no gradient)."""
        return self.dequantize(self.assign(values), values.dtype)

    def extra_repr(self) -> str:
        grouped = (f", groups={self.groups}" if self.groups > 1 else "") + (
            ", channel scales" if self.channel_scale is not None else "")
        return (f"k={self.k}, scale={self.scale.item():.4g}" + grouped
                + (", zero" if self.zero else ""))
