"""Fast exact kernels behind the hard and abs penalties.

The plain autograd formula (assign, gather, subtract, square, mean, divide by the mean
square) keeps an int64 index and several float copies of every weight alive until backward
and runs a dozen passes over them. Here one `torch.autograd.Function` computes the value,
and the per-cluster sums that the representatives' gradient needs, in its forward pass and
saves one small integer per weight (1 byte for k <= 256); backward rebuilds the distances
from them with one gather. Float tensors on the CPU take compiled passes that read each
weight once (`qareg.penalty_cpu`); elsewhere, or for other dtypes, torch ops run through
slices (`_sums_torch`, `_gradient_torch`): 32760 entries on the CPU, so that every
temporary stays in cache and every op runs on the calling thread (see CHUNK).

For P = sum_i |w_i - c_a(i)|^p / (N D), D = m^(p/2), m = max(mean(w^2), floor), u = 1 where
mean(w^2) >= floor (0 where clamped: the floor then blocks the gradient), p = 2 (hard) or
p = 1 (abs), and d_i = w_i - c_a(i):

    dP/dw_i = p / (N D) * |d_i|^(p-1) sign(d_i)  -  u * p * P * w_i / (N m)
    dP/dc_j = -p / (N D) * sum over {i : a(i) = j} of |d_i|^(p-1) sign(d_i)

Finding a(i). `qareg.assign` is a binary search (`bucketize`), scalar and the slowest step
on the CPU. `Lookup` instead cuts the line into cells narrower than the smallest gap between
midpoints, so each cell holds at most one midpoint. A value's cell g and one comparison with
that cell's midpoint give its key g + cells * (value > midpoint); small tables map keys to
the representative and its index: exactly the binary search's answer, ties included (a value
on a midpoint goes to the representative below). A codebook with a nearly collapsed pair
gets a coarser grid whose cells hold up to MAX_DEPTH midpoints, one comparison each.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from qareg import penalty_cpu
from qareg.codebook import _midpoints_rounded_down

MAX_CELLS = 1 << 16  # cells in the grid: a finer one would fall out of cache
MAX_DEPTH = 4  # midpoints one cell may hold; a codebook that needs more uses bucketize
MIN_CELL_NUMEL = 1 << 15  # below this, building the tables costs more than they save
# Entries per slice on the CPU: just below ATen's parallel grain (32768), so that every op
# runs on the calling thread. Thousands of small ops, each split over threads, would each
# wait for a descheduled thread on a busy machine: a time slice (~8 ms) per op, seconds per
# step on a shared 2-core machine. Temporaries stay in cache.
CHUNK = 8 * 4095  # 32760: also a multiple of the 8 rows of `_add_key_sums`
GPU_CHUNK = 1 << 22  # entries per slice elsewhere: bounds the temporaries' memory


def _cells(values: Tensor, lo: float, inv_width: float, last: int, out: Tensor,
           scratch: Tensor) -> Tensor:
    """Cell of every value: clamp(trunc((v - lo) * inv_width), 0, last), into integer `out`.

    Each step is one correctly rounded elementwise operation, so the map is monotone
    (v <= v' gives cell(v) <= cell(v')) and the same for every element of every tensor of
    one dtype, which is all that the lookup relies on. NaN goes to cell 0, harmlessly.
    """
    torch.sub(values, lo, out=scratch)
    scratch.mul_(inv_width).clamp_(0, last).nan_to_num_(0.0)
    return out.copy_(scratch)


def _chunk_size(device: torch.device) -> int:
    """Entries processed at once: cache-sized on the CPU; everywhere small enough that the
    temporaries add little to peak memory."""
    return CHUNK if device.type == "cpu" else GPU_CHUNK


class Lookup:
    """Nearest representatives of `like` or slices of it, through keys and small tables.

    `keys(values)` gives an int64 key per value; `key_values[key]` is the nearest
    representative and `key_index[key]` its index, so that `key_index[keys(v)]` equals
    `qareg.assign(v, representatives)`. On the CPU a key is g + cells * a: g the value's
    cell, a the number of the cell's midpoints below the value (the module docstring);
    elsewhere, or where no grid fits, keys are the indices themselves, from `bucketize`.
    """

    def __init__(self, representatives: Tensor, like: Tensor) -> None:
        assert representatives.dim() == 1, (
            f"representatives must be 1-D, got {tuple(representatives.shape)}")
        c = representatives.detach().to(like.dtype)  # (k,)
        self.boundaries = _midpoints_rounded_down(c, like.dtype).to(like.device)  # (k - 1,)
        self.grid = None
        if (like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64)
                and like.numel() >= MIN_CELL_NUMEL):
            self.grid = self._grid(self.boundaries)
        if self.grid is None:
            self.key_values, self.key_index = c, torch.arange(c.numel(), device=c.device)
            return
        last, bounds, cell_of_boundary = self.grid[2], self.grid[3], self.grid[4]
        # base[g]: midpoints in cells below g, the index of the representative at the bottom
        # of cell g; a value above a of the cell's midpoints has index base[g] + a.
        base = torch.searchsorted(cell_of_boundary, torch.arange(last + 1))  # (cells,)
        self.key_index = torch.cat([(base + a).clamp(max=c.numel() - 1)
                                    for a in range(len(bounds) + 1)])  # (keys,)
        self.key_values = c[self.key_index]  # (keys,)

    @staticmethod
    def _grid(boundaries: Tensor) -> tuple[float, float, int, list[Tensor], Tensor] | None:
        """(lo, inv_width, last cell, bounds, cell of each boundary), or None. bounds[r][g]
        is the r-th midpoint in cell g (+inf for none). Cells are narrower than the smallest
        gap, so that each holds one midpoint, unless that takes more than MAX_CELLS cells."""
        b = boundaries.tolist()
        if not all(map(math.isfinite, b)):
            return None
        gaps = [b[i + 1] - b[i] for i in range(len(b) - 1)]
        width = max(0.99 * min(gaps) if gaps else max(abs(b[0]), 1.0),
                    (b[-1] - b[0]) / (MAX_CELLS - 4))
        if not (width > 1e-30 and abs(b[0]) + 2 * width < 1e30):
            return None
        lo = b[0] - width
        last, inv_width = int((b[-1] - lo) / width) + 2, 1 / width
        cell_of_boundary = _cells(boundaries, lo, inv_width, last,  # (k - 1,)
                                  torch.empty(len(b), dtype=torch.int64),
                                  torch.empty_like(boundaries))
        first = torch.searchsorted(cell_of_boundary, cell_of_boundary)  # first in its cell
        rank = torch.arange(len(b)) - first  # (k - 1,) place of each midpoint in its cell
        depth = int(rank.max()) + 1
        if depth > MAX_DEPTH:
            return None
        bounds = torch.full((depth, last + 1), math.inf, dtype=boundaries.dtype)
        bounds[rank, cell_of_boundary] = boundaries
        return lo, inv_width, last, list(bounds), cell_of_boundary

    @property
    def num_keys(self) -> int:
        return self.key_values.numel()

    def keys(self, values: Tensor, buffers: Buffers) -> Tensor:
        """(N,) int64 key of every value of the 1-D `values`, in `buffers.key`."""
        if self.grid is None:
            return torch.bucketize(values, self.boundaries, out=buffers.key)
        lo, inv_width, last, bounds, _ = self.grid
        cell, scratch, above = buffers.cell, buffers.scratch, buffers.above
        _cells(values, lo, inv_width, last, cell, scratch)  # (N,) cell g
        # one pass for nearly every codebook; with more, gather by a copy of g
        g = cell if len(bounds) == 1 else buffers.key.copy_(cell)
        for bound in bounds:
            torch.gt(values, torch.index_select(bound, 0, g, out=scratch), out=above)
            cell.add_(above, alpha=last + 1)  # g + cells * (midpoints below the value)
        return buffers.key.copy_(cell)  # int64: scatter_add_ takes no other


class Buffers:
    """Scratch tensors for one slice of `size` entries like `like`: allocated once per call
    and reused for every slice (allocating per slice costs more than the arithmetic)."""

    def __init__(self, size: int, like: Tensor) -> None:
        self.cell = torch.empty(size, dtype=torch.int32, device=like.device)
        self.key = torch.empty(size, dtype=torch.int64, device=like.device)
        self.scratch = torch.empty(size, dtype=like.dtype, device=like.device)
        self.above = torch.empty(size, dtype=torch.bool, device=like.device)
        self.distance = torch.empty(size, dtype=like.dtype, device=like.device)

    def first(self, n: int) -> Buffers:
        """These buffers cut to their first n entries (for the last, shorter slice)."""
        if n == self.key.numel():
            return self
        cut = copy.copy(self)
        cut.__dict__.update({name: t[:n] for name, t in vars(self).items()})
        return cut


def nearest_indices(values: Tensor, representatives: Tensor) -> Tensor:
    """`qareg.assign(values, representatives)`: the same indices, faster on the CPU."""
    flat = values.detach().reshape(-1)  # (N,)
    lookup = Lookup(representatives, flat)
    indices = torch.empty(flat.numel(), dtype=torch.int64, device=flat.device)  # (N,)
    size = max(1, min(flat.numel(), _chunk_size(flat.device)))
    buffers = Buffers(size, flat)
    for part, out in zip(flat.split(size), indices.split(size), strict=True):
        keys = lookup.keys(part, buffers.first(part.numel()))
        torch.index_select(lookup.key_index, 0, keys, out=out)
    return indices.view(values.shape)


def _add_key_sums(sums: Tensor, keys: Tensor, values: Tensor) -> None:
    """sums[r, j] += the sum of `values` where `keys` is j, over `values` cut into rows r
    when the length allows: scatter_add_ along rows is about twice as fast as one bincount
    on the CPU (which also scans for the min and max)."""
    rows = sums.shape[0] if keys.numel() % sums.shape[0] == 0 else 1
    sums[:rows].scatter_add_(1, keys.view(rows, -1), values.view(rows, -1))


def _norm(values: Tensor) -> Tensor:
    """The 2-norm, whose square is the sum of squares; not torch.dot(values, values), whose
    BLAS threads would split even a small slice."""
    return torch.linalg.vector_norm(values)


def index_dtype(num_keys: int) -> torch.dtype:
    """The smallest integer type that holds 0..num_keys-1: uint8 up to 256 keys."""
    return torch.uint8 if num_keys <= 256 else torch.int16 if num_keys <= 1 << 15 else torch.int32


def _sums_torch(w: Tensor, representatives: Tensor, power: int
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward pass's per-weight and per-tensor quantities with torch ops, through
    cache-sized slices: (saved, table, pull, sum of w^2, sum of |d|^p).

    `saved` holds one small integer per weight and `table[saved]` is its representative;
    `pull` (k,) is the sum of |d|^(p-1) sign(d) over each representative's weights; the
    sums are 0-d float64 tensors (no host sync on a GPU).
    """
    n, k = w.numel(), representatives.numel()
    lookup = Lookup(representatives, w)
    key_values = lookup.key_values  # (K,) representative of each key
    # Saved per weight: its key, or its index where that takes fewer bytes (k <= 256
    # but more than 256 keys); `table` maps what is saved to the representative.
    by_index = index_dtype(lookup.num_keys).itemsize > index_dtype(k).itemsize
    table = representatives.detach().to(w.dtype) if by_index else key_values
    saved = torch.empty(n, dtype=index_dtype(table.numel()), device=w.device)
    index_of_key = lookup.key_index.to(saved.dtype) if by_index else None
    key_pull = torch.zeros(8, lookup.num_keys, dtype=w.dtype, device=w.device)  # (8, K)
    # per slice: the norm of w; the norm of d (p = 2) or the sum of |d| (p = 1)
    norms, distances = [], []
    size = max(1, min(n, _chunk_size(w.device)))
    buffers = Buffers(size, w)
    for part, saved_part in zip(w.split(size), saved.split(size), strict=True):
        b = buffers.first(part.numel())
        key = lookup.keys(part, b)  # (chunk,) int64
        if by_index:
            torch.index_select(index_of_key, 0, key, out=saved_part)
        else:
            saved_part.copy_(key)
        norms.append(_norm(part))
        d = torch.index_select(key_values, 0, key, out=b.distance)  # c_a
        torch.sub(part, d, out=d)  # d = w - c_a
        if power == 2:
            _add_key_sums(key_pull, key, d)
            distances.append(_norm(d))
        else:
            _add_key_sums(key_pull, key, torch.sign(d, out=b.scratch))
            distances.append(d.abs_().sum())
    pull = key_pull.sum(0)  # (K,)
    if lookup.grid is not None:  # keys are cells: fold them onto the representatives
        pull = torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(
            0, lookup.key_index, pull)
    totals = torch.stack(norms + distances).double()  # per slice, added in float64
    totals[: len(norms) if power == 1 else None].square_()  # norms to sums of squares
    return saved, table, pull, totals[: len(norms)].sum(), totals[len(norms):].sum()


def _sums_cpu(w: Tensor, representatives: Tensor, power: int
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`_sums_torch` in one parallel compiled pass (`qareg.penalty_cpu`); saves indices."""
    table = representatives.detach().to(w.dtype)  # (k,)
    saved = torch.empty(w.numel(), dtype=index_dtype(table.numel()))
    lookup = None if penalty_cpu.linear(table.numel(), power) else Lookup(table, w)
    pull, sum_square, sum_distance = penalty_cpu.forward_sums(w.contiguous(), table, power,
                                                              saved, lookup)
    sums = torch.tensor([sum_square, sum_distance], dtype=torch.float64)
    return saved, table, pull, sums[0], sums[1]


def _gradient_torch(weights: Tensor, saved: Tensor, table: Tensor, power: int, s_d: Tensor,
                    s_w: Tensor) -> Tensor:
    """dP/dw = s_d * |d|^(p-1) sign(d) + s_w * w with torch ops, through slices."""
    w = weights.reshape(-1)
    # Not a view: autograd then adds the task's gradient into it in place.
    grad = torch.empty(weights.shape, dtype=w.dtype, device=w.device)
    flat = grad.view(-1)  # (N,)
    size = max(1, min(w.numel(), _chunk_size(w.device)))
    index = torch.empty(size, dtype=torch.int64, device=w.device)
    slices = zip(w.split(size), saved.split(size), flat.split(size), strict=True)
    for part, saved_part, out in slices:  # (chunk,) each
        key = index[: part.numel()].copy_(saved_part)
        torch.index_select(table, 0, key, out=out)  # c_a
        torch.sub(part, out, out=out)  # d
        if power == 1:
            out.sign_()
        out.mul_(s_d).addcmul_(part, s_w)
    return grad


class NearestPenalty(torch.autograd.Function):
    """P = mean(|w - c_a|^p) / max(mean(w^2), floor)^(p/2) for p = 1 or 2 (module
    docstring); saves 1 byte per weight for k <= 256 and tensors of a few times k entries."""

    @staticmethod
    def forward(ctx, weights: Tensor, representatives: Tensor, floor: Tensor,
                power: int) -> Tensor:
        assert power in (1, 2), f"power must be 1 or 2, got {power}"
        w = weights.detach().reshape(-1)  # (N,)
        n = w.numel()
        sums = _sums_cpu if penalty_cpu.supports(w) else _sums_torch
        saved, table, pull, sum_square, sum_distance = sums(w, representatives, power)
        mean_square = (sum_square / n).to(w.dtype)
        unclamped = (mean_square >= floor).to(w.dtype)  # clamp_min passes gradient at ==
        m = torch.maximum(mean_square, floor.to(w.dtype))
        denominator = m if power == 2 else m.sqrt()
        value = (sum_distance / n).to(w.dtype) / denominator
        scale_d, scale_w = power / (n * denominator), power / (n * m)
        # Besides one small integer per weight only tensors of a few times k entries;
        # `weights` is the caller's own tensor, saved by reference.
        ctx.save_for_backward(weights, saved, table, pull.to(w.dtype), value, unclamped,
                              scale_d, scale_w)
        ctx.power, ctx.rep_dtype = power, representatives.dtype
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        weights, saved, table, pull, value, unclamped, scale_d, scale_w = ctx.saved_tensors
        s_d = grad_output * scale_d  # 0-d tensors throughout: no host sync on a GPU
        grad_w = grad_c = None
        if ctx.needs_input_grad[0]:
            s_w = -grad_output * scale_w * value * unclamped
            if penalty_cpu.supports(weights):
                grad_w = penalty_cpu.gradient(weights.detach(), saved, table, ctx.power,
                                              s_d.item(), s_w.item())
            else:
                grad_w = _gradient_torch(weights.detach(), saved, table, ctx.power, s_d, s_w)
        if ctx.needs_input_grad[1]:
            grad_c = (-s_d * pull).to(ctx.rep_dtype)
        return grad_w, grad_c, None, None
