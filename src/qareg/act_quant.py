"""Quantized activations during training and after: each quantized layer's input goes
through a uniform quantizer with a learned step (LSQ's rule, Esser et al. 2020).

`attach_input_quantizers(model, bits, calibration)` gives every Conv and Linear layer an
`input_quantizer` submodule, its step started from the calibrated input range (as in
`qareg.activations`), and a forward pre-hook that applies it. The quantizer is part of the
model: its step trains with the weights (straight-through rounding, the paper's step
gradient), it is saved in checkpoints and compressed files (its step, bits and sign are
state entries), and `attach_like` rebuilds it when a file is loaded. A layer whose
calibration inputs are all >= 0 (after a ReLU) gets the unsigned grid {0 .. 2^A - 1} * s,
any other the signed one; at A bits a batch of inputs takes at most 2^A distinct values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from qareg.activations import run_with_input_hooks
from qareg.constants import DEFAULT_LAYERS
from qareg.errors import ConfigError
from qareg.ste import round_ste, scale_grad
from qareg.uniform import integer_range
from qareg.validate import check_int

NAME = "input_quantizer"
MIN_STEP = 1e-8


class InputQuantizer(nn.Module):
    """Fake quantization of a layer's input on a uniform grid with a learned step."""

    def __init__(self, bits: int, signed: bool, step: float) -> None:
        super().__init__()
        check_int("act_bits", bits, 2, 16)
        self.step = nn.Parameter(torch.tensor(float(max(step, MIN_STEP))))
        self.register_buffer("bits", torch.tensor(bits))
        self.register_buffer("signed", torch.tensor(bool(signed)))

    def levels(self) -> tuple[int, int]:
        return integer_range(int(self.bits), bool(self.signed))

    def effective_step(self) -> Tensor:
        """The step the forward pass divides by (|step|, at least MIN_STEP), detached."""
        return self.step.detach().abs().clamp(min=MIN_STEP)

    def forward(self, x: Tensor) -> Tensor:
        qmin, qmax = self.levels()
        gradient_scale = 1.0 / math.sqrt(max(1, x[0].numel()) * qmax)
        step = scale_grad(self.step.abs().clamp(min=MIN_STEP), gradient_scale).to(x.dtype)
        return round_ste(torch.clamp(x / step, qmin, qmax)) * step

    def extra_repr(self) -> str:
        return f"bits={int(self.bits)}, signed={bool(self.signed)}"


# Methods' own input quantizers (subclasses), by a state entry only that kind has, so that
# `attach_like` rebuilds the right one from a file: e.g. CPQ's "log_sigma".
KINDS: dict[str, type[InputQuantizer]] = {}


def register_input_quantizer(entry: str, cls: type[InputQuantizer]) -> type[InputQuantizer]:
    """Make `attach_like` rebuild `cls` wherever a state has its own `entry`."""
    KINDS[entry] = cls
    return cls


def apply_input_quantizer(module: nn.Module, args: tuple) -> tuple:
    """The forward pre-hook of a layer with an input quantizer."""
    return (getattr(module, NAME)(args[0]), *args[1:])


def _attach(module: nn.Module, quantizer: InputQuantizer) -> None:
    module.add_module(NAME, quantizer)
    module.register_forward_pre_hook(apply_input_quantizer)


def input_quantizers(model: nn.Module) -> dict[str, InputQuantizer]:
    """The input quantizers of `model`, by the name of the layer they serve."""
    return {name.removesuffix("." + NAME): m for name, m in model.named_modules()
            if isinstance(m, InputQuantizer)}


@torch.no_grad()
def attach_input_quantizers(model: nn.Module, bits: int, calibration: Iterable,
                            max_batches: int = 8, percentile: float = 99.99,
                            make: Callable[[int, bool, float], InputQuantizer | None]
                            | None = None) -> dict[str, InputQuantizer]:
    """Give each Conv and Linear layer of `model` an input quantizer at `bits`, its step
    started from the `percentile` of |input| over the first `max_batches` of `calibration`
    (inputs, or (inputs, labels) pairs). `make(bits, signed, step)` builds a method's own
    kind (`Method.input_quantizer`; None from it: this module's). Returns them by layer
    name."""
    check_int("act_bits", bits, 2, 16)
    if input_quantizers(model):
        raise ConfigError("the model has input quantizers already")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, DEFAULT_LAYERS)}
    if not layers:
        raise ConfigError("the model has no Conv or Linear layer to quantize the input of")
    seen: dict[str, list[Tensor]] = {name: [] for name in layers}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen[name].append(args[0].detach().flatten().float())
        return hook

    run_with_input_hooks(model, layers, {n: recorder(n) for n in layers}, calibration,
                         max_batches)
    for name, module in layers.items():
        if not seen[name]:
            raise ConfigError(f"the calibration batches never reach layer {name!r}")
        values = torch.cat(seen[name])
        signed = bool(values.min() < 0)
        qmax = integer_range(bits, signed)[1]
        magnitude = torch.quantile(values.abs()[:1 << 20], percentile / 100).item()
        step = magnitude / qmax if magnitude else 1.0
        own = make(bits, signed, step) if make is not None else None
        _attach(module, own if own is not None else InputQuantizer(bits, signed, step))
    return input_quantizers(model)


def attach_like(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Give `model` an input quantizer wherever `state` (a state dict, or a compressed
    file's raw tensors) has one, so that loading `state` then restores it."""
    suffix = f".{NAME}.bits"
    for key, bits in state.items():
        if key.endswith(suffix):
            layer = key.removesuffix(suffix)
            signed = state[f"{layer}.{NAME}.signed"]
            kind = next((cls for entry, cls in KINDS.items()
                         if f"{layer}.{NAME}.{entry}" in state), InputQuantizer)
            _attach(model.get_submodule(layer), kind(int(bits), bool(signed), 1.0))
