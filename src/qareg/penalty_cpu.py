"""The hard and abs penalties' passes over the weights on the CPU, compiled by numba.

`NearestPenalty` (`qareg.penalty_kernels`) needs, per weight, the index of its nearest
representative and the distance to it; per tensor, the sums of w^2 and of |d|^p and, per
representative, the sum of |d|^(p-1) sign(d) over its weights. `forward_sums` computes all of
them in one pass that reads each weight once; `gradient` writes dP/dw in one more. Both
split the tensor into contiguous ranges over as many threads as torch uses, with per-range
sums added in float64 at the end. Compared with torch's elementwise ops (a dozen passes,
each a separate call) this cuts the penalty's cost about threefold on vgg16.

The nearest representative is always exactly `qareg.assign`'s (a value on a midpoint goes
to the representative below), by one of three routes:
- hard penalty, k <= LINEAR_MAX_K: per block of BLOCK weights, one sweep per midpoint
  counts the midpoints below each weight. The sweeps vectorize (no gathers), and the
  per-cluster sums come from suffix sums (weights above each midpoint, and their number).
- a codebook with a `Lookup` cell grid (larger k, large tensors): the cell and one
  comparison per midpoint in the cell, as `Lookup.keys` does, one weight at a time;
- otherwise a branch-free binary search over the midpoints padded with +inf to a power
  of two minus one.
NaN goes to index 0 and gives a NaN penalty. The first call compiles (a few seconds per
kernel and dtype; cached on disk afterwards) and loads numba's runtime, about 70 MiB of
resident memory for the process.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from qareg.codebook import _midpoints_rounded_down

if TYPE_CHECKING:
    from qareg.penalty_kernels import Lookup

PARALLEL_NUMEL = 1 << 16  # below this, one thread: waking others costs more than it saves
LINEAR_MAX_K = 16  # up to this k the hard penalty takes the vectorized sweep per midpoint
BLOCK = 1024  # weights per block of that pass: its scratch stays in the first-level cache


def supports(weights: Tensor) -> bool:
    """Whether these kernels can take `weights`: float32 or float64 on the CPU."""
    return weights.device.type == "cpu" and weights.dtype in (torch.float32, torch.float64)


def padded_boundaries(boundaries: Tensor) -> np.ndarray:
    """The k - 1 midpoints followed by +inf up to 2^levels - 1 entries."""
    size = 1 << math.ceil(math.log2(boundaries.numel() + 1))
    padded = torch.full((size - 1,), math.inf, dtype=boundaries.dtype)
    padded[: boundaries.numel()] = boundaries.cpu()
    return padded.numpy()


PARTS_PER_THREAD = 4  # ranges per thread: a thread slowed by other work holds up less


def linear(k: int, power: int) -> bool:
    """Whether `forward_sums` takes the vectorized pass (no `Lookup` needed)."""
    return power == 2 and k <= LINEAR_MAX_K


def _split(n: int) -> tuple[int, int]:
    """(threads, ranges) for a pass over n entries: as many threads as torch uses."""
    if n < PARALLEL_NUMEL:
        return 1, 1
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    return threads, PARTS_PER_THREAD * threads


@njit(inline="always")
def _search(value, boundaries):  # noqa: ANN001, ANN202 - numba
    """Count of `boundaries` (sorted, 2^levels - 1 entries) strictly below `value`."""
    position = 0
    step = (boundaries.size + 1) >> 1
    while step > 0:
        position += step * (boundaries[position + step - 1] < value)
        step >>= 1
    return position


@njit(inline="always")
def _grid_lookup(value, lo, inv_width, last, bounds, key_index):  # noqa: ANN001, ANN202
    """`Lookup.keys` for one value, then its index: the value's cell g, plus the number of
    cells for each of the cell's midpoints below it (`qareg.penalty_kernels`)."""
    x = min(max((value - lo) * inv_width, 0), last)
    cell = np.int64(x) if x == x else 0  # NaN: cell 0, as torch's nan_to_num
    key = cell
    for row in range(bounds.shape[0]):
        key += (last + 1) * (value > bounds[row, cell])
    return key_index[key]


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


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def _forward_linear(weights, boundaries, representatives, saved, suffix, totals):  # noqa: ANN001
    """The hard penalty's pass for small k, vectorized: per block of BLOCK weights, one
    sweep per midpoint j counts it into each weight's index, sets the weight's
    representative, and adds the weights above it and their number into suffix[part, :, j
    + 1] (suffix[part, :, 0]: all of them); per-cluster sums are differences of these."""
    n, parts, k = weights.size, suffix.shape[0], representatives.size
    for part in prange(parts):
        index = np.empty(BLOCK, np.uint8)
        nearest = np.empty(BLOCK, weights.dtype)
        sums, counts = suffix[part, 0], suffix[part, 1]
        sum_square, sum_distance = 0.0, 0.0
        stop = (part + 1) * n // parts
        for start in range(part * n // parts, stop, BLOCK):
            block = weights[start:min(stop, start + BLOCK)]
            m = block.size
            total = 0.0
            for i in range(m):
                index[i] = 0
                nearest[i] = representatives[0]
                total += np.float64(block[i])
            sums[0] += total
            counts[0] += m
            for j in range(k - 1):
                midpoint, above_value = boundaries[j], representatives[j + 1]
                total, count = 0.0, 0
                for i in range(m):
                    above = block[i] > midpoint
                    index[i] += above
                    nearest[i] = above_value if above else nearest[i]
                    total += np.float64(block[i]) if above else 0.0
                    count += above
                sums[j + 1] += total
                counts[j + 1] += count
            for i in range(m):
                d = block[i] - nearest[i]  # in the weights' dtype, as torch computes it
                saved[start + i] = index[i]
                sum_square += np.float64(block[i]) * np.float64(block[i])
                sum_distance += np.float64(d) * np.float64(d)
        totals[part, 0] = sum_square
        totals[part, 1] = sum_distance


@njit(parallel=True, cache=True)
def _forward_search(weights, boundaries, representatives, power, saved, pulls, totals):  # noqa: ANN001
    n, parts = weights.size, pulls.shape[0]
    for part in prange(parts):
        sums = np.zeros(2)
        for i in range(part * n // parts, (part + 1) * n // parts):
            index = _search(weights[i], boundaries)
            saved[i] = index
            _accumulate(weights[i], index, representatives, power, pulls, part, sums)
        totals[part] = sums


@njit(parallel=True, cache=True)
def _forward_grid(weights, lo, inv_width, last, bounds, key_index, representatives, power,  # noqa: ANN001
                  saved, pulls, totals):
    n, parts = weights.size, pulls.shape[0]
    for part in prange(parts):
        sums = np.zeros(2)
        for i in range(part * n // parts, (part + 1) * n // parts):
            index = _grid_lookup(weights[i], lo, inv_width, last, bounds, key_index)
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
                 lookup: Lookup | None) -> tuple[Tensor, float, float]:
    """Fill `saved` with each weight's nearest index; return the (k,) float64 sums of
    |d|^(p-1) sign(d) per representative, the sum of w^2 and the sum of |d|^p.

    `weights` is 1-D and contiguous, `representatives` (k,) sorted, in its dtype. `lookup`
    (a `Lookup` for them) is needed unless `linear(k, power)`.
    """
    n, k = weights.numel(), representatives.numel()
    threads, parts = _split(n)
    numba.set_num_threads(threads)
    totals = np.zeros((parts, 2), dtype=np.float64)
    w, c, out = weights.numpy(), representatives.numpy(), saved.numpy()
    if linear(k, power):
        boundaries = _midpoints_rounded_down(representatives, weights.dtype).numpy()
        suffix = np.zeros((parts, 2, k + 1), dtype=np.float64)  # sums, counts above
        _forward_linear(w, boundaries, c, out, suffix, totals)
        above = suffix.sum(axis=0)  # (2, k + 1)
        with np.errstate(invalid="ignore"):  # inf - inf: infinite weights give a NaN penalty
            sums, counts = above[0, :-1] - above[0, 1:], above[1, :-1] - above[1, 1:]  # (k,)
            pull = sums - counts * c.astype(np.float64)  # sum of d = sum of w - count * c
    else:
        pulls = np.zeros((parts, k), dtype=np.float64)
        if lookup.grid is None:
            _forward_search(w, padded_boundaries(lookup.boundaries), c, power, out, pulls,
                            totals)
        else:
            lo, inv_width, last, bounds, _ = lookup.grid
            dtype = w.dtype.type  # the cell arithmetic in the weights' dtype, as Lookup.keys
            _forward_grid(w, dtype(lo), dtype(inv_width), last, torch.stack(bounds).numpy(),
                          lookup.key_index.numpy(), c, power, out, pulls, totals)
        pull = pulls.sum(axis=0)
    sum_square, sum_distance = totals.sum(axis=0)
    return torch.from_numpy(pull), float(sum_square), float(sum_distance)


def gradient(weights: Tensor, saved: Tensor, representatives: Tensor, power: int,
             scale_d: float, scale_w: float) -> Tensor:
    """dP/dw = scale_d * |d|^(p-1) sign(d) + scale_w * w, as a new tensor of weights' shape."""
    out = torch.empty(weights.shape, dtype=weights.dtype)
    threads, _ = _split(weights.numel())
    numba.set_num_threads(threads)
    w = weights.reshape(-1).numpy()
    scalar = w.dtype.type
    _gradient(w, saved.numpy(), representatives.numpy(), power, scalar(scale_d), scalar(scale_w),
              out.view(-1).numpy())
    return out
