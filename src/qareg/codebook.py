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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qareg.cluster1d import initial_representatives
from qareg.nearest import assign

# Smallest distance between neighbouring representatives, in units of the tensor's scale.
MIN_GAP = 1e-5


def rms_scale(values: Tensor) -> float:
    """Root mean square of `values`, or 1.0 when they are all zero."""
    rms = values.detach().double().square().mean().sqrt().item()
    return rms if rms > 0 else 1.0


def _spread_up(ordered: Tensor, gap: Tensor) -> Tensor:
    """Sorted `ordered` with each value at least `gap` above the previous one, moving each
    only up and only as far as needed (the first stays put)."""
    steps = torch.arange(ordered.numel(), device=ordered.device, dtype=torch.float64) * gap
    return torch.cummax(ordered - steps, dim=0).values + steps


class Codebook(nn.Module):
    """k learnable representatives for one tensor, kept sorted and distinct."""

    def __init__(self, k: int, scale: float = 1.0, zero: bool = False) -> None:
        super().__init__()
        assert k >= 2, f"a codebook needs k >= 2, got {k}"
        self.zero = zero  # one representative pinned at exactly 0 (set again by prepare)
        # (k,) representatives divided by `scale`; the learnable part.
        self.normalized = nn.Parameter(torch.arange(k, dtype=torch.float32))
        # Scale of the tensor when the codebook was made (its RMS); fixed, not learned.
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.project_()

    @classmethod
    def fit(
        cls, values: Tensor, k: int, init: str = "kmeans-exact",
        generator: torch.Generator | None = None, zero: bool = False,
    ) -> Codebook:
        """A codebook for `values`, initialised by one of `qareg.cluster1d.INITS` (with
        `zero`, the representative nearest to 0 then moved to 0)."""
        scale = rms_scale(values)
        codebook = cls(k, scale, zero)
        start = initial_representatives(values, k, init, generator) / scale
        with torch.no_grad():
            codebook.normalized.copy_(start.float())
        codebook.project_()
        return codebook.to(values.device)

    @property
    def k(self) -> int:
        return self.normalized.numel()

    @property
    def bits(self) -> int:
        """Bits per index: ceil(log2 k)."""
        return max(1, math.ceil(math.log2(self.k)))

    def representatives(self) -> Tensor:
        """(k,) representatives in the tensor's units; differentiable."""
        return self.normalized * self.scale

    @torch.no_grad()
    def project_(self) -> None:
        """Sort and enforce gaps of at least MIN_GAP: c_i >= c_(i-1) + MIN_GAP.

        Sorting then a running maximum of c_i - i * gap moves each representative up only
        as far as needed; representatives already in order with room between them stay put.
        The gap grows with the largest |c| so that it stays many float32 steps wide.
        """
        ordered = self.normalized.double().sort().values
        gap = MIN_GAP * ordered.abs().max().clamp(min=1.0)
        if not self.zero:
            self.normalized.copy_(_spread_up(ordered, gap))
            return
        j = int(ordered.abs().argmin())  # pinned: 0, the others spread away from it
        ordered[j] = 0.0
        above = _spread_up(ordered[j:], gap)
        below = -_spread_up(-ordered[:j + 1].flip(0), gap).flip(0)
        self.normalized.copy_(torch.cat([below[:-1], above]))

    def assign(self, values: Tensor) -> Tensor:
        """Index of the nearest representative for every value of `values` (the rule of
        `qareg.nearest`)."""
        return assign(values, self.representatives())

    def quantize(self, values: Tensor) -> Tensor:
        """`values` with each entry replaced by its nearest representative (no gradient)."""
        with torch.no_grad():
            return self.representatives().to(values.dtype)[self.assign(values)]

    def extra_repr(self) -> str:
        return f"k={self.k}, scale={self.scale.item():.4g}" + (", zero" if self.zero else "")
