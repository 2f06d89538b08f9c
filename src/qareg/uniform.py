"""Symmetric uniform quantization of weights: the fixed-point grid and its scale search.

Weights at b bits take the values `scale * q` with the integer q in the full signed range
[-2^(b-1), 2^(b-1) - 1]. The restricted symmetric range [-(2^(b-1) - 1), 2^(b-1) - 1] would
waste one of the 2^b codes the storage pays for: at 2 bits it has 3 levels instead of 4, at 3
bits 7 instead of 8. The one extra negative level costs nothing, and the scale search below
finds the clipping that suits it. At 1 bit the grid is binary, {-s, +s}, with s = mean |w|,
the value that minimises the squared error of s * sign(w).

The scale is `ratio * max|w| / (2^(b-1) - 1)`: the clipping ratio is chosen among
`clip_ratios` candidates i / n (i = 1..n) by the smallest squared error, per tensor or per
output channel (dim 0). Ratio 1 (max-abs scaling) is always a candidate, so the search is
never worse than it.

- `uniform_scale`, `uniform_grid`, `uniform_quantize`: the pure functions;
- `quantize_weights_`: quantizes a model's selected tensors in place and returns the grids.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from qareg.quantize import select_tensors

MAX_CLIP_RATIOS = 10_000  # candidates in the scale search
SEARCH_CHUNK = 1 << 22  # elements of one (ratios, channels, weights) block of the search


def integer_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of the integer codes at `bits` (>= 2 when signed): the full range."""
    if signed:
        assert bits >= 2, f"the signed integer grid needs bits >= 2 (1 bit is binary), got {bits}"
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _rows(w: Tensor, per_channel: bool) -> Tensor:
    """(C, M) view of `w`: one row per output channel, or a single row."""
    return w.reshape(w.shape[0], -1) if per_channel and w.dim() > 0 else w.reshape(1, -1)


def _per_row(scale: Tensor, w: Tensor) -> Tensor:
    """`scale` (C,) or () shaped to broadcast over `w`'s dim 0."""
    return scale.reshape(-1, *[1] * (w.dim() - 1)) if scale.dim() == 1 else scale


def fake_quantize(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """`scale * clamp(round(x / scale), qmin, qmax)`; `scale` broadcasts against `x`."""
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


def uniform_scale(w: Tensor, bits: int, per_channel: bool = False, clip_ratios: int = 100
                  ) -> Tensor:
    """The MSE-optimal scale among `clip_ratios` clipping ratios of max|w|: shape () per
    tensor, (C,) per output channel. At 1 bit: mean |w|, the binary grid's level."""
    rows = _rows(w.detach(), per_channel)  # (C, M)
    if bits == 1:
        scale = rows.abs().mean(dim=1)  # (C,)
        return scale if per_channel else scale[0]
    qmin, qmax = integer_range(bits)
    top = rows.abs().amax(dim=1)  # (C,)
    top = torch.where(top > 0, top, torch.ones_like(top))  # an all-zero row: any scale works
    ratios = torch.arange(1, clip_ratios + 1, dtype=w.dtype, device=w.device) / clip_ratios
    best_err = torch.full_like(top, math.inf)
    best = top / qmax  # max-abs scaling, ratio 1
    chunk = max(1, SEARCH_CHUNK // rows.numel())  # ratios per block: bounded memory
    for start in range(0, clip_ratios, chunk):
        scales = ratios[start:start + chunk, None] * top / qmax  # (R, C)
        q = fake_quantize(rows, scales[..., None], qmin, qmax)  # (R, C, M)
        err = (q - rows).square().sum(dim=2)  # (R, C)
        low, index = err.min(dim=0)  # (C,): the first (smallest) ratio among ties
        better = low < best_err
        best_err = torch.where(better, low, best_err)
        best = torch.where(better, scales.gather(0, index[None])[0], best)
    return best if per_channel else best[0]


def uniform_grid(scale: Tensor, bits: int) -> Tensor:
    """The sorted grid values of `scale` at `bits`: (2^b,) per tensor, (C, 2^b) per channel."""
    if bits == 1:
        levels = torch.tensor([-1.0, 1.0], dtype=scale.dtype, device=scale.device)
    else:
        qmin, qmax = integer_range(bits)
        levels = torch.arange(qmin, qmax + 1, dtype=scale.dtype, device=scale.device)
    return scale[..., None] * levels  # scale >= 0: sorted


def uniform_quantize(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    """`w` on the grid of `scale` (() or (C,) for dim 0): nearest level, clipped at the ends;
    at 1 bit s * sign(w), with sign(0) = +1."""
    s = _per_row(scale.to(w.dtype), w)
    if bits == 1:
        return torch.where(w >= 0, s, -s)  # (w's shape)
    return fake_quantize(w, s, *integer_range(bits))


@torch.no_grad()
def quantize_weights_(model: nn.Module, bits: int, per_channel: bool = False,
                      clip_ratios: int = 100, names: Iterable[str] | None = None
                      ) -> dict[str, Tensor]:
    """Quantize the selected tensors (default `select_tensors(model)`) of `model` in place;
    returns each one's grid: (2^b,) per tensor, (C, 2^b) per channel."""
    grids = {}
    for name in select_tensors(model) if names is None else names:
        weight = model.get_parameter(name)
        scale = uniform_scale(weight, bits, per_channel, clip_ratios)
        weight.copy_(uniform_quantize(weight, scale, bits))
        grids[name] = uniform_grid(scale, bits)
    return grids
