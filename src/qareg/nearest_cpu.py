"""Compiled (numba) routes of the nearest-representative rule on the CPU, behind
`qareg.nearest.assign`; `qareg.penalty_cpu` inlines the same lookups into its fused passes.

Both take the rule's boundaries (`qareg.nearest.midpoints`, in the values' dtype) and count
the boundaries strictly below a value, which is its index:
- `search`: a branch-free binary search over the boundaries padded with +inf to a power of
  two minus one entries;
- `grid_index`: a `Grid` cuts the line into cells narrower than the smallest gap between
  boundaries, so that a cell holds at most MAX_DEPTH of them; a value's cell and one
  comparison per boundary in it give the count. Worth building for large tensors only.

Passes split a tensor into contiguous ranges over as many threads as torch uses. NaN goes
to index 0. The first call compiles (seconds; cached on disk afterwards).

Numba runs them on its own "workqueue" threads unless NUMBA_THREADING_LAYER says otherwise:
its OpenMP layer shares the OpenMP runtime with torch's kernels, and once started it changed
their floating-point results (conv gradients differed in the last bits), so a run resumed
in a new process no longer matched one never interrupted.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

if "NUMBA_THREADING_LAYER" not in os.environ:  # see the module docstring
    numba.config.THREADING_LAYER = "workqueue"

MAX_CELLS = 1 << 16  # cells in a grid: a finer one would fall out of cache
MAX_DEPTH = 4  # boundaries one cell may hold; a codebook that needs more uses the search
GRID_MIN_NUMEL = 1 << 15  # below this, building a grid costs more than it saves
COUNT_MAX_K = 32  # up to this k (< 256) a pass counts boundaries with one sweep each
BLOCK = 1024  # values per block of a counting pass: its scratch stays in the first-level cache
PARALLEL_NUMEL = 1 << 16  # below this, one thread: waking others costs more than it saves
PARTS_PER_THREAD = 4  # ranges per thread: a thread slowed by other work holds up less


def supports(values: Tensor) -> bool:
    """Whether the compiled routes take `values`: float32 or float64 on the CPU."""
    return values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64)


def thread_plan(n: int) -> tuple[int, int]:
    """(threads, ranges) for a pass over n entries, and numba set to that many threads."""
    if n < PARALLEL_NUMEL:
        threads, parts = 1, 1
    else:
        threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        parts = PARTS_PER_THREAD * threads
    numba.set_num_threads(threads)
    return threads, parts


def counted(k: int) -> bool:
    """Whether a pass at k representatives counts the boundaries below each value with one
    vectorized sweep per boundary (on vgg16 as fast as the grid or faster up to k = 32)."""
    return k <= COUNT_MAX_K


def grid_for(boundaries: Tensor, numel: int) -> Grid | None:
    """The grid a pass over `numel` values should look up, or None for the binary search:
    large tensors, where a grid fits (`Grid.build`)."""
    return Grid.build(boundaries) if numel >= GRID_MIN_NUMEL else None


def padded_boundaries(boundaries: Tensor) -> np.ndarray:
    """The k - 1 boundaries followed by +inf up to 2^levels - 1 entries."""
    size = 1 << math.ceil(math.log2(boundaries.numel() + 1))
    padded = torch.full((size - 1,), math.inf, dtype=boundaries.dtype)
    padded[: boundaries.numel()] = boundaries.cpu()
    return padded.numpy()


@njit(inline="always")
def search(value, padded):  # noqa: ANN001, ANN201 - numba
    """Count of `padded` boundaries (sorted, 2^levels - 1 entries) strictly below `value`."""
    position = 0
    step = (padded.size + 1) >> 1
    while step > 0:
        position += step * (padded[position + step - 1] < value)
        step >>= 1
    return position


@njit(inline="always")
def cell_of(value, lo, inv_width, last):  # noqa: ANN001, ANN201
    """clamp(trunc((value - lo) * inv_width), 0, last), in the value's dtype: monotone, and
    the same map for boundaries and values. NaN: cell 0."""
    x = min(max((value - lo) * inv_width, 0), last)
    return np.int64(x) if x == x else 0


@njit(inline="always")
def grid_index(value, lo, inv_width, last, bounds, base):  # noqa: ANN001, ANN201
    """Count of boundaries below `value`: those in cells below its cell (base[cell]), plus
    those of its own cell below it (bounds[:, cell], padded with +inf)."""
    cell = cell_of(value, lo, inv_width, last)
    index = base[cell]
    for row in range(bounds.shape[0]):
        index += value > bounds[row, cell]
    return index


@njit(cache=True)
def _cells(boundaries, lo, inv_width, last):  # noqa: ANN001, ANN202
    out = np.empty(boundaries.size, np.int64)
    for i in range(boundaries.size):
        out[i] = cell_of(boundaries[i], lo, inv_width, last)
    return out


@dataclass(frozen=True)
class Grid:
    """Cells over the boundaries of one codebook, for `grid_index` (module docstring)."""

    lo: np.floating  # left end of cell 0, in the values' dtype
    inv_width: np.floating  # 1 / cell width, in the values' dtype
    last: int  # index of the last cell
    bounds: np.ndarray  # (depth, last + 1) the r-th boundary of each cell, +inf for none
    base: np.ndarray  # (last + 1,) int64 boundaries in the cells below each cell

    @staticmethod
    def build(boundaries: Tensor) -> Grid | None:
        """The grid for these (sorted) boundaries, or None where none fits: non-finite or
        extreme values, or more than MAX_DEPTH boundaries crowded into one cell."""
        b = boundaries.cpu().numpy()
        if b.size == 0 or not np.isfinite(b).all():
            return None
        values = b.astype(np.float64)
        gaps = np.diff(values)
        width = max(0.99 * gaps.min() if gaps.size else max(abs(values[0]), 1.0),
                    (values[-1] - values[0]) / (MAX_CELLS - 4))
        if not (width > 1e-30 and abs(values[0]) + 2 * width < 1e30):
            return None
        dtype = b.dtype.type
        lo, inv_width = dtype(values[0] - width), dtype(1 / width)
        last = int((values[-1] - (values[0] - width)) / width) + 2
        cell = _cells(b, lo, inv_width, last)  # (k - 1,) nondecreasing
        first = np.searchsorted(cell, cell)  # first boundary of each one's cell
        rank = np.arange(b.size) - first  # place of each boundary in its cell
        depth = int(rank.max()) + 1
        if depth > MAX_DEPTH:
            return None
        bounds = np.full((depth, last + 1), np.inf, dtype=b.dtype)
        bounds[rank, cell] = b
        base = np.searchsorted(cell, np.arange(last + 1)).astype(np.int64)
        return Grid(lo, inv_width, last, bounds, base)


@njit(parallel=True, cache=True)
def _assign_count(values, boundaries, parts, out):  # noqa: ANN001, ANN202
    n = values.size
    for part in prange(parts):
        index = np.empty(BLOCK, np.uint8)  # k <= COUNT_MAX_K < 256: narrow lanes
        stop = (part + 1) * n // parts
        for start in range(part * n // parts, stop, BLOCK):
            block = values[start:min(stop, start + BLOCK)]
            m = block.size
            index[:m] = 0
            for j in range(boundaries.size):
                boundary = boundaries[j]
                for i in range(m):
                    index[i] += block[i] > boundary
            out[start:start + m] = index[:m]


@njit(parallel=True, cache=True)
def _assign_search(values, padded, parts, out):  # noqa: ANN001, ANN202
    n = values.size
    for part in prange(parts):
        for i in range(part * n // parts, (part + 1) * n // parts):
            out[i] = search(values[i], padded)


@njit(parallel=True, cache=True)
def _assign_grid(values, lo, inv_width, last, bounds, base, parts, out):  # noqa: ANN001, ANN202
    n = values.size
    for part in prange(parts):
        for i in range(part * n // parts, (part + 1) * n // parts):
            out[i] = grid_index(values[i], lo, inv_width, last, bounds, base)


def assign(values: Tensor, boundaries: Tensor) -> Tensor:
    """int64 index of every entry of `values` (float32 or float64 on the CPU): the count of
    `boundaries` (the rule's, in `values`' dtype) strictly below it."""
    flat = values.reshape(-1).contiguous()  # (N,)
    out = torch.empty(flat.numel(), dtype=torch.int64)
    _, parts = thread_plan(flat.numel())
    if counted(boundaries.numel() + 1):
        _assign_count(flat.numpy(), boundaries.cpu().numpy(), parts, out.numpy())
        return out.view(values.shape)
    grid = grid_for(boundaries, flat.numel())
    if grid is None:
        _assign_search(flat.numpy(), padded_boundaries(boundaries), parts, out.numpy())
    else:
        _assign_grid(flat.numpy(), grid.lo, grid.inv_width, grid.last, grid.bounds, grid.base,
                     parts, out.numpy())
    return out.view(values.shape)
