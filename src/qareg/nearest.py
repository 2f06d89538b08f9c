"""The nearest-representative rule, written once. Every route from a weight to its
representative (convert, compressed files, the snapped forward pass, the penalties, dkm,
codebook initialisation) goes through this module.

The rule. For representatives c_0 < c_1 < ... < c_(k-1), a value goes to the nearest one; a
value exactly on a midpoint (c_j + c_(j+1)) / 2 goes to the lower one, c_j. The midpoints
are computed exactly and rounded *down* to the values' dtype (`midpoints`): for a value v of
that dtype, v <= round_down(m) exactly when v <= m, so comparing against these boundaries
decides every value, ties included, as exact arithmetic would. -inf goes to index 0, +inf
to k - 1; NaN has no nearest representative (index 0 on the CPU; training stops on NaN
before it matters).

Routes, all giving the same indices (tests/test_nearest.py checks each against the others):
- `torch.bucketize` over the boundaries: any device and dtype, and the reference;
- compiled passes on the CPU for float32 and float64 (`qareg.nearest_cpu`): a branch-free
  binary search, or a cell grid for large tensors. The penalty's fused passes
  (`qareg.penalty_cpu`) use the same compiled lookups.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qareg import nearest_cpu

COMPILED_MIN_NUMEL = 1 << 12  # below this, bucketize costs less than calling compiled code


def _round_down_float64(a: Tensor, b: Tensor) -> Tensor:
    """(a + b) / 2 rounded down to float64, exactly, for float64 `a` and `b`.

    s = fl(a + b) and its rounding error e (two-sum: s + e = a + b exactly); s / 2 is exact
    (barring subnormals), and the exact midpoint s / 2 + e / 2 lies below it, by less than
    one step of float64, exactly when e < 0.
    """
    s = a + b
    b_part = s - a
    error = (a - (s - b_part)) + (b - b_part)
    half = s / 2
    return torch.where(error < 0, torch.nextafter(half, torch.full_like(half, -math.inf)), half)


def midpoints(representatives: Tensor, dtype: torch.dtype) -> Tensor:
    """(k - 1,) midpoints of neighbouring representatives, exact, then rounded down to
    `dtype`: the boundaries of the rule (module docstring). `representatives` (k,) must be
    strictly increasing; the result is on their device."""
    assert representatives.dim() == 1, (
        f"representatives must be 1-D, got shape {tuple(representatives.shape)}")
    c = representatives.detach().double()
    exact_down = _round_down_float64(c[:-1], c[1:])  # (k - 1,) no float64 in (this, m]
    rounded = exact_down.to(dtype)
    too_high = rounded.double() > exact_down
    lower = torch.nextafter(rounded, torch.full_like(rounded, -math.inf))
    return torch.where(too_high, lower, rounded)


def assign(values: Tensor, representatives: Tensor, boundaries: Tensor | None = None
           ) -> Tensor:
    """Index of the nearest representative (the rule above) for every entry of `values`:
    an int64 tensor of `values`' shape. `representatives` (k,) must be strictly increasing.
    `boundaries` (k - 1,), non-decreasing, replace the midpoints where given (an
    entropy-constrained assignment, `qareg.budget`): index = boundaries below the value.

    O(N log k) time and no N x k matrix: a binary search of the k - 1 boundaries, compiled
    on the CPU for float32 and float64 tensors of COMPILED_MIN_NUMEL entries or more.
    """
    if boundaries is None:
        boundaries = midpoints(representatives, values.dtype)
    boundaries = boundaries.to(device=values.device, dtype=values.dtype)  # (k - 1,)
    flat = values.detach()
    if nearest_cpu.supports(flat) and flat.numel() >= COMPILED_MIN_NUMEL:
        return nearest_cpu.assign(flat, boundaries)
    # bucketize: boundaries[i - 1] < v <= boundaries[i] -> i, so a value exactly on a
    # (rounded-down) midpoint goes to the representative below it.
    return torch.bucketize(flat, boundaries)


def index_dtype(k: int) -> torch.dtype:
    """The smallest integer type that holds 0 .. k - 1: uint8 up to 256 representatives."""
    return torch.uint8 if k <= 256 else torch.int16 if k <= 1 << 15 else torch.int32
