"""Symmetric uniform quantization: the fixed-point baseline, and activation quantization.

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
- `quantize_weights_`: quantizes a model's selected tensors in place and returns the grids;
- `quantize_activations`: post-training fake quantization of every Conv/Linear layer's input,
  calibrated on a few batches; returns a handle that removes it;
- `ptq-uniform`: the method on the harness.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice

import torch
from torch import Tensor, nn

from qareg.config import check_bool, check_float, check_int
from qareg.errors import ConfigError
from qareg.methods.base import Method, check_bits, register_method
from qareg.quantize import DEFAULT_LAYERS, select_tensors

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


class _InputRange:
    """Forward pre-hook that records the range of a layer's input over calibration batches."""

    def __init__(self, percentile: float) -> None:
        self.percentile = percentile
        self.magnitudes: list[float] = []  # per batch: the percentile of |x|
        self.minimum = math.inf  # over all batches: decides a signed or an unsigned grid

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().flatten()
        k = max(1, min(x.numel(), math.ceil(self.percentile / 100 * x.numel())))
        self.magnitudes.append(x.abs().float().kthvalue(k).values.item())
        self.minimum = min(self.minimum, x.min().item())


class _InputQuantizer:
    """Forward pre-hook that fake-quantizes a layer's input on a fixed grid."""

    def __init__(self, scale: float, qmin: int, qmax: int) -> None:
        self.scale, self.qmin, self.qmax = scale, qmin, qmax

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (fake_quantize(x, torch.tensor(self.scale, dtype=x.dtype, device=x.device),
                              self.qmin, self.qmax), *args[1:])


class ActivationQuantization:
    """The handle of `quantize_activations`: the grid of each layer, and `remove()`."""

    def __init__(self) -> None:
        self.grids: dict[str, tuple[float, int, int]] = {}  # layer -> (scale, qmin, qmax)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def remove(self) -> None:
        """Take the quantizers off the model (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationQuantization:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@torch.no_grad()
def quantize_activations(model: nn.Module, bits: int, calibration: Iterable,
                         percentile: float = 99.99, max_batches: int | None = None
                         ) -> ActivationQuantization:
    """Fake-quantize the input of every Conv and Linear layer of `model` at `bits` (2 to 8).

    The inputs, not the outputs: they are what an integer kernel consumes, after the
    nonlinearity, so a post-ReLU input gets the whole unsigned grid {0 .. 2^b - 1} * s. A
    layer whose calibration inputs are all >= 0 gets that unsigned grid, any other the signed
    one; the range is the `percentile` of |input| (100: the maximum) per batch, averaged over
    the `calibration` batches (inputs, or (inputs, labels) pairs, on the model's device),
    measured in full precision on the model as it is (quantize the weights first).
    """
    check_int("bits", bits, 2, 8)  # 1 bit: no signed integer grid for inputs
    check_float("percentile", percentile, 0, 100, low_open=True)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, DEFAULT_LAYERS)}
    if not layers:
        raise ConfigError("quantize_activations: the model has no Conv or Linear layer")
    if any(isinstance(h, _InputQuantizer) for m in layers.values()
           for h in m._forward_pre_hooks.values()):  # they would distort the calibration
        raise ConfigError("quantize_activations: the model already has activation "
                          "quantizers; remove() them first")
    recorders = {name: _InputRange(percentile) for name in layers}
    handles = [m.register_forward_pre_hook(recorders[name]) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in islice(calibration, max_batches):
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    result = ActivationQuantization()
    for name, module in layers.items():
        recorder = recorders[name]
        if not recorder.magnitudes:
            raise ConfigError("quantize_activations: the calibration batches are empty, or "
                              f"never reach layer {name!r}")
        qmin, qmax = integer_range(bits, signed=recorder.minimum < 0)
        magnitude = sum(recorder.magnitudes) / len(recorder.magnitudes)
        scale = magnitude / qmax if magnitude > 0 else 1.0  # all-zero inputs: any scale
        result.grids[name] = (scale, qmin, qmax)
        result._handles.append(module.register_forward_pre_hook(
            _InputQuantizer(scale, qmin, qmax)))
    return result


@dataclass(frozen=True)
class UniformConfig:
    """Post-training symmetric uniform quantization of the weights."""

    per_channel: bool = False  # one scale per output channel; finalize refuses it (see below)
    clip_ratios: int = 100  # MSE scale search over clipping ratios i/n of max|w|; 1: max-abs

    def __post_init__(self) -> None:
        check_bool("per_channel", self.per_channel)
        check_int("clip_ratios", self.clip_ratios, 1, MAX_CLIP_RATIOS)


def refuse_per_channel(method: str, per_channel: bool) -> None:
    """The harness keeps one codebook per tensor; a per-channel grid has up to C * 2^b values."""
    if per_channel:
        raise ConfigError(
            f"{method}: per_channel=True cannot be finalized: the harness stores one codebook "
            "of at most 2**bits values per tensor, and per-channel scales give up to "
            "channels * 2**bits distinct values; use per_channel=False here, or "
            "quantize_weights_(..., per_channel=True) / bit_width_sweep(per_channel=True) to "
            "measure per-channel accuracy")


@register_method
class PtqUniformMethod(Method):
    """Full-precision training; symmetric uniform quantization at each bit-width afterwards."""

    name = "ptq-uniform"
    config_class = UniformConfig
    post_training = True

    def prepare(self, model: nn.Module, bits: int | None, seed: int) -> None:
        refuse_per_channel(self.name, self.config.per_channel)  # before training, not after
        super().prepare(model, bits, seed)

    def finalize(self, model: nn.Module, bits: int, calibration: Iterable | None = None
                 ) -> dict[str, Tensor]:
        refuse_per_channel(self.name, self.config.per_channel)
        check_bits(bits)
        return quantize_weights_(model, bits, clip_ratios=self.config.clip_ratios)
