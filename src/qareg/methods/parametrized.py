"""The shared base of methods that train through a learnable quantizer per weight tensor
(lsq, dkm, cpq): each quantizer is a `torch.nn.utils.parametrize` parametrization of its
weight, so `state_dict`, `deepcopy` and DistributedDataParallel see its parameters.

A subclass names its quantizer class, an `nn.Module` built as `quantizer_class(weights,
bits, config, generator)` whose `snap(weights, bits)` returns the weights as the trained
quantizer leaves them and the grid they take; preparing, finding the quantizers, their
optimizer group and finalizing are written here once.

Removing a parametrization needs care: `copy.deepcopy` of a parametrized module shares the
class torch injected into it with the original, and `remove_parametrizations` deletes the
tensor's property from that class, so finalizing a copy (the engine does, after every
epoch) would break the model still training. `remove_parametrization` gives the module a
private copy of its class first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from qareg.errors import ConfigError, NotPreparedError
from qareg.methods.base import Calibration, Grids, Method
from qareg.quantize import select_tensors
from qareg.validate import check_float, check_patterns


@dataclass(frozen=True)
class QuantizerOptions:
    """What every quantizer method configures: its learning rate and which tensors."""

    lr_scale: float = 1.0  # learning rate of the quantizers' parameters = lr * this
    include: tuple[str, ...] = ()  # glob patterns of tensors; empty: Conv and Linear weights
    exclude: tuple[str, ...] = ()  # glob patterns of tensors left in full precision

    def __post_init__(self) -> None:
        check_float("lr_scale", self.lr_scale, 0, low_open=True)
        object.__setattr__(self, "include", check_patterns("include", self.include))
        object.__setattr__(self, "exclude", check_patterns("exclude", self.exclude))


def find_parametrizations(model: nn.Module, kind: type[nn.Module]
                          ) -> dict[str, tuple[nn.Module, nn.Module]]:
    """{qualified tensor name: (owning module, its parametrization of type `kind`)}, in
    module order."""
    found = {}
    for prefix, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attribute, chain in module.parametrizations.items():
            for quantizer in chain:
                if isinstance(quantizer, kind):
                    found[f"{prefix}.{attribute}" if prefix else attribute] = (module, quantizer)
    return found


def parametrize_selected(model: nn.Module, include: Sequence[str], exclude: Sequence[str],
                         make: Callable[[Tensor], nn.Module]) -> None:
    """Register `make(weights)` as a parametrization of every tensor `select_tensors`
    chooses, after checking that the model has none yet."""
    taken = [name for name, m in model.named_modules() if parametrize.is_parametrized(m)]
    if taken:
        raise ConfigError(f"modules {taken} are parametrized already: was prepare called twice?")
    for name in select_tensors(model, include or None, exclude):
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        weights = getattr(module, attribute).detach()
        parametrize.register_parametrization(module, attribute, make(weights))


def remove_parametrization(module: nn.Module, attribute: str, leave_parametrized: bool) -> None:
    """`parametrize.remove_parametrizations`, safe for deep copies (module docstring)."""
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    parametrize.remove_parametrizations(module, attribute, leave_parametrized=leave_parametrized)


def latent_weight(module: nn.Module, attribute: str) -> Tensor:
    """The full-precision tensor behind `module.<attribute>`: under a parametrization the
    original it quantizes, else the attribute itself."""
    if parametrize.is_parametrized(module, attribute):
        return module.parametrizations[attribute].original
    return getattr(module, attribute)


class ParametrizedMethod(Method):
    """A method whose quantizers parametrize the chosen weights (module docstring)."""

    config_class: ClassVar[type] = QuantizerOptions
    # (weights, bits, config, generator) -> the quantizer of one tensor, with snap()
    quantizer_class: ClassVar[type[nn.Module]]

    def check_finalize_bits(self, bits: int) -> None:
        """Quantizers are trained for the prepared bit-width and finalized at it."""
        if self.bits is not None and bits != self.bits:
            raise ConfigError(f"{self.name} was prepared for {self.bits} bits and is finalized "
                              f"at the same bits; got {bits}")

    def prepare(self, model: nn.Module, bits: int | None, seed: int) -> None:
        bits = self.resolve_bits(bits)
        super().prepare(model, bits, seed)
        generator = torch.Generator().manual_seed(seed)
        parametrize_selected(model, self.config.include, self.config.exclude,
                             lambda w: self.quantizer_class(w, bits, self.config, generator))

    def quantizers(self, model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
        """{tensor name: (owning module, quantizer)}; the model must be prepared."""
        found = find_parametrizations(model, self.quantizer_class)
        if not found:
            raise NotPreparedError(f"{self.name}: the model has no {self.quantizer_class.__name__}"
                                   f"; call create_method({self.name!r}).prepare(model, bits, "
                                   "seed) first")
        return found

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        params = [p for _, q in self.quantizers(model).values() for p in q.parameters()]
        return [{"params": params, "lr_scale": self.config.lr_scale}]

    def finalize(self, model: nn.Module, bits: int, calibration: Calibration = None) -> Grids:
        """Each weight as its quantizer snaps it, parametrizations removed; the grids."""
        self.check_finalize_bits(bits)
        found = self.quantizers(model)
        grids = {}
        for name, (module, quantizer) in found.items():
            attribute = name.rpartition(".")[2]
            values, grid = quantizer.snap(latent_weight(module, attribute), bits)
            remove_parametrization(module, attribute, leave_parametrized=False)
            with torch.no_grad():
                getattr(module, attribute).copy_(values)
            grids[name] = grid.detach()
        return grids
