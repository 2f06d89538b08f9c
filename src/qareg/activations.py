"""Post-training fake quantization of layer inputs (activations) on a uniform grid.

`quantize_activations` quantizes the input of every Conv and Linear layer, calibrated on a
few batches, and returns a handle that removes the quantizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from itertools import islice

import torch
from torch import nn

from qareg.constants import DEFAULT_LAYERS
from qareg.errors import ConfigError
from qareg.uniform import fake_quantize, integer_range
from qareg.validate import check_float, check_int


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
def run_with_input_hooks(model: nn.Module, layers: Mapping[str, nn.Module],
                         hooks: Mapping[str, Callable], calibration: Iterable,
                         max_batches: int | None = None) -> None:
    """Run `model` in eval mode over `calibration` (inputs, or (inputs, labels) pairs) with
    `hooks[name]` as a forward pre-hook of `layers[name]`; hooks removed and the mode
    restored afterwards, whatever happens."""
    handles = [layers[name].register_forward_pre_hook(hook) for name, hook in hooks.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in islice(calibration, max_batches):
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


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
    run_with_input_hooks(model, layers, recorders, calibration, max_batches)
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
