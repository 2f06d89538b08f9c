"""Helpers for methods whose quantizers are `torch.nn.utils.parametrize` parametrizations
of the weights (lsq, dkm, cpq): register them on the chosen tensors, find them, remove them.

Removing needs care: `copy.deepcopy` of a parametrized module shares the class torch
injected into it with the original, and `remove_parametrizations` deletes the tensor's
property from that class; finalizing a copy (the engine does, after every epoch) would
break the model still training. `remove_parametrization` gives the module a private copy
of its class first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

from qareg.errors import ConfigError
from qareg.quantize import select_tensors


def check_patterns(name: str, value: Any) -> tuple[str, ...]:
    """`value` must be a list of non-empty glob patterns; returns it as a tuple."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"{name} must be a list of non-empty glob patterns such as "
                          f"'features.*.weight', got {value!r}")
    return tuple(value)


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
    """`parametrize.remove_parametrizations`, safe for deep copies.

    `copy.deepcopy` of a parametrized module shares the class torch injected into it with
    the original, and removing deletes the tensor's property from that class, so the
    engine's snapped copy would break the model still training. The module gets a private
    copy of the class first.
    """
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    parametrize.remove_parametrizations(module, attribute, leave_parametrized=leave_parametrized)
