"""Compiled CPU passes of the hard and abs penalties (`qareg.penalty_kernels`).

For P = sum_i |w_i - c_a(i)|^p / (N D), the forward pass needs each weight's nearest index
a(i), sum w^2, sum |d|^p and, per representative, the sum of |d|^(p-1) sign(d); backward
needs dP/dw. `forward_sums` computes all of them in one pass that reads each weight once;
`gradient` writes dP/dw in one more. Both split the tensor into contiguous ranges over as
many threads as torch uses, with per-range sums added in float64 at the end. Compared with
torch's elementwise ops (a dozen passes, each a separate call) this cuts the penalty's cost
about threefold on vgg16.

The nearest index follows `qareg.nearest`'s rule through its compiled lookups
(`qareg.nearest_cpu`: counting up to k = 32, else the binary search, or the cell grid on
large tensors). Counting: per block of BLOCK weights, one vectorized sweep per boundary
counts the boundaries below each weight (no gathers, no branches), then one pass over the
block adds up the sums, kept in registers and in a (k,) array local to each range. Over
vgg16's weights at k = 16 this pass takes about a third of the time of the sweeps it
replaced (which carried each weight's representative and float64 suffix sums through every
sweep) and about half the grid's (BENCHMARKS.md, "Cost of the regularizer").
NaN goes to index 0 and gives a NaN penalty. The first call compiles and loads numba's
runtime, about 70 MiB of resident memory for the process.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from qareg import nearest_cpu
from qareg.nearest import midpoints
from qareg.nearest_cpu import (
    BLOCK,
    counted,
    grid_for,
    grid_index,
    padded_boundaries,
    search,
    thread_plan,
)


def supports(weights: Tensor) -> bool:
    """Whether these kernels can take `weights`: float32 or float64 on the CPU."""
    return nearest_cpu.supports(weights)


@njit(inline="always")
def _accumulate(value, index, representatives, power, pulls, part, sums):  # noqa: ANN001
    d = value - representatives[index]
    sums[0] += value * value
    if power == 2:
        sums[1] += d * d
        pulls[part, index] += d
    else:
        sums[1] += abs(d)
        pulls[part, index] += np.sign(d)


@njit(parallel=True, cache=True)
def _forward_count(weights, boundaries, representatives, power, saved, pulls, totals):  # noqa: ANN001
    """The pass for small k: per block of BLOCK weights, one vectorized sweep per boundary
    counts it into each weight's index (no gathers, no branches), then one pass over the
    block adds each weight's terms into sums held in registers and a (k,) array local to
    the range."""
    n, parts, k = weights.size, pulls.shape[0], representatives.size
    for part in prange(parts):
        index = np.empty(BLOCK, np.uint8)
        pull = np.zeros(k)
        sum_square, sum_distance = 0.0, 0.0
        stop = (part + 1) * n // parts
        for start in range(part * n // parts, stop, BLOCK):
            block = weights[start:min(stop, start + BLOCK)]
            m = block.size
            index[:m] = 0
            for j in range(k - 1):
                boundary = boundaries[j]
                for i in range(m):
                    index[i] += block[i] > boundary
            for i in range(m):
                a = index[i]
                value = block[i]
                d = np.float64(value - representatives[a])  # in the weights' dtype, as torch
                saved[start + i] = a
                sum_square += np.float64(value) * np.float64(value)
                if power == 2:
                    sum_distance += d * d
                    pull[a] += d
                else:
                    sum_distance += abs(d)
                    pull[a] += np.float64(d > 0) - np.float64(d < 0)
        pulls[part] = pull
        totals[part, 0] = sum_square
        totals[part, 1] = sum_distance


@njit(parallel=True, cache=True)
def _forward_search(weights, boundaries, representatives, power, saved, pulls, totals):  # noqa: ANN001
    n, parts = weights.size, pulls.shape[0]
    for part in prange(parts):
        sums = np.zeros(2)
        for i in range(part * n // parts, (part + 1) * n // parts):
            index = search(weights[i], boundaries)
            saved[i] = index
            _accumulate(weights[i], index, representatives, power, pulls, part, sums)
        totals[part] = sums


@njit(parallel=True, cache=True)
def _forward_grid(weights, lo, inv_width, last, bounds, base, representatives, power,  # noqa: ANN001
                  saved, pulls, totals):
    n, parts = weights.size, pulls.shape[0]
    for part in prange(parts):
        sums = np.zeros(2)
        for i in range(part * n // parts, (part + 1) * n // parts):
            index = grid_index(weights[i], lo, inv_width, last, bounds, base)
            saved[i] = index
            _accumulate(weights[i], index, representatives, power, pulls, part, sums)
        totals[part] = sums


@njit(parallel=True, cache=True)
def _gradient(weights, saved, representatives, power, scale_d, scale_w, out):  # noqa: ANN001
    """out = scale_d * |d|^(p-1) sign(d) + scale_w * w, elementwise; the scales are of the
    weights' dtype, so that the loop vectorizes."""
    if power == 2:
        for i in prange(weights.size):
            value = weights[i]
            out[i] = scale_d * (value - representatives[saved[i]]) + scale_w * value
    else:
        for i in prange(weights.size):
            value = weights[i]
            out[i] = scale_d * np.sign(value - representatives[saved[i]]) + scale_w * value


def forward_sums(weights: Tensor, representatives: Tensor, power: int, saved: Tensor,
                 boundaries: Tensor | None = None) -> tuple[Tensor, float, float]:
    """Fill `saved` with each weight's nearest index; return the (k,) float64 sums of
    |d|^(p-1) sign(d) per representative, the sum of w^2 and the sum of |d|^p.

    `weights` is 1-D and contiguous, `representatives` (k,) strictly increasing, in its
    dtype.
    """
    n, k = weights.numel(), representatives.numel()
    _, parts = thread_plan(n)
    totals = np.zeros((parts, 2), dtype=np.float64)
    w, c, out = weights.numpy(), representatives.numpy(), saved.numpy()
    if boundaries is None:  # the nearest rule's; else given (entropy-constrained)
        boundaries = midpoints(representatives, weights.dtype)  # (k - 1,)
    pulls = np.zeros((parts, k), dtype=np.float64)
    if counted(k):
        _forward_count(w, boundaries.numpy(), c, power, out, pulls, totals)
    elif (grid := grid_for(boundaries, n)) is None:
        _forward_search(w, padded_boundaries(boundaries), c, power, out, pulls, totals)
    else:
        _forward_grid(w, grid.lo, grid.inv_width, grid.last, grid.bounds, grid.base, c,
                      power, out, pulls, totals)
    pull = pulls.sum(axis=0)
    sum_square, sum_distance = totals.sum(axis=0)
    return torch.from_numpy(pull), float(sum_square), float(sum_distance)


@njit(parallel=True, cache=True)
def _gradient_plus(weights, saved, representatives, power, scale_d, scale_w, plus, out):  # noqa: ANN001
    """`_gradient`'s value, rounded, plus `plus`: what adding the two tensors gives."""
    if power == 2:
        for i in prange(weights.size):
            value = weights[i]
            own = scale_d * (value - representatives[saved[i]]) + scale_w * value
            out[i] = own + plus[i]
    else:
        for i in prange(weights.size):
            value = weights[i]
            own = scale_d * np.sign(value - representatives[saved[i]]) + scale_w * value
            out[i] = own + plus[i]


def gradient(weights: Tensor, saved: Tensor, representatives: Tensor, power: int,
             scale_d: float, scale_w: float, plus: Tensor | None = None) -> Tensor:
    """dP/dw = scale_d * |d|^(p-1) sign(d) + scale_w * w, as a new tensor of weights' shape;
    with `plus` (weights' shape and dtype), dP/dw + plus in the same pass (the sum autograd
    would make of the two)."""
    out = torch.empty(weights.shape, dtype=weights.dtype)
    thread_plan(weights.numel())
    w = weights.reshape(-1).numpy()
    scalar = w.dtype.type
    args = (w, saved.numpy(), representatives.numpy(), power, scalar(scale_d), scalar(scale_w))
    if plus is None:
        _gradient(*args, out.view(-1).numpy())
    else:
        _gradient_plus(*args, plus.reshape(-1).contiguous().numpy(), out.view(-1).numpy())
    return out


@njit(parallel=True, cache=True)
def _gather(table, saved, out):  # noqa: ANN001
    for i in prange(saved.size):
        out[i] = table[saved[i]]


@njit(cache=True)
def _sum_by_index(values, saved, out):  # noqa: ANN001
    for i in range(values.size):  # one thread, in order: the sums torch's index_add_ makes
        out[saved[i]] += values[i]


def gather(table: Tensor, saved: Tensor, shape: torch.Size) -> Tensor:
    """`table[saved]` shaped `shape`, without widening the small indices to int64."""
    out = torch.empty(shape, dtype=table.dtype)
    thread_plan(saved.numel())
    _gather(table.numpy(), saved.numpy(), out.view(-1).numpy())
    return out


def sum_by_index(values: Tensor, saved: Tensor, k: int) -> Tensor:
    """(k,) sums of `values` (1-D, contiguous) per index, in their dtype and in order."""
    out = np.zeros(k, dtype=values.numpy().dtype)
    _sum_by_index(values.numpy(), saved.numpy(), out)
    return torch.from_numpy(out)
