"""The harness every compression method plugs into: one interface, one registry.

A method is a config dataclass plus a `Method` subclass registered under its name. The
engine and `qareg bench` treat every method alike:

1. `prepare(model, bits, seed)` attaches what training needs: codebooks, learnable
   quantizers (as `torch.nn.utils.parametrize` parametrizations of the weights), hooks.
2. Training: `loss = task + method.regularizer(...)` on one line of the engine; the method's
   own parameters (`param_groups`) get no weight decay and their own learning-rate scale.
3. `finalize(model, bits, calibration)` makes the network a plain one whose selected weights
   hold only the values of a small grid, and returns that grid per tensor. The harness then
   attaches the grids as codebooks (`attach_codebooks`) and runs `qareg.convert`, so every
   method ends in the same form: the same accuracy check, report, bits per weight and
   compressed file.

Post-training methods (`post_training = True`: ptq-kmeans, ptq-uniform, gradl1) train once
without knowing the bit-width (`prepare(model, None, seed)`) and are finalized at every
bit-width from copies of the same trained network.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from qareg.codebook import Codebook
from qareg.config import TrainConfig
from qareg.errors import ConfigError
from qareg.quantize import (
    CODEBOOK_SUFFIX,
    ConversionReport,
    _candidates,
    convert,
    quantized_tensors,
)
from qareg.registry import Registry

MAX_BITS = 8  # bit-widths the harness accepts: 1 .. MAX_BITS (k = 2**bits)


@dataclass(frozen=True)
class Progress:
    """Where training stands when the regularizer is evaluated."""

    step: int  # optimizer steps done before this one
    total_steps: int  # steps in the whole run
    epoch: int  # 1-based epoch of this step
    epochs: int  # epochs in the whole run

    @property
    def fraction(self) -> float:
        """Share of training done, in [0, 1)."""
        return self.step / max(1, self.total_steps)


class Method(ABC):
    """One compression method on the common harness (see the module docstring)."""

    name: ClassVar[str]  # the registry name, e.g. "lsq"
    config_class: ClassVar[type]  # frozen dataclass with defaults, validated in __post_init__
    post_training: ClassVar[bool] = False  # True: trains once, quantized at any bits afterwards

    def __init__(self, config: Any = None) -> None:
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise ConfigError(f"method {self.name!r} takes a {self.config_class.__name__}, got "
                              f"{type(config).__name__}")
        self.config = config
        self.bits: int | None = None  # set by prepare

    def prepare(self, model: nn.Module, bits: int | None, seed: int) -> None:
        """Attach what training needs to `model`, in place. `bits` is None for post-training
        methods, which learn without knowing the bit-width."""
        self.bits = bits

    def training(self, recipe: TrainConfig) -> TrainConfig:
        """The recipe this method trains with in a benchmark, given the shared one (same
        epochs); a method whose optimizer needs differ (gradl1) overrides it."""
        return recipe

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The method's own parameters (codebooks, step sizes, gates), as optimizer groups:
        `{"params": [...], "lr_scale": float}`. They get no weight decay and a learning rate
        of `lr * lr_scale`."""
        return []

    def forward_context(self, model: nn.Module, progress: Progress
                        ) -> AbstractContextManager[Any]:
        """A context the engine runs the training step's forward pass in (the regularizer
        is computed after it, outside); by default none."""
        return nullcontext()

    def lam(self, progress: Progress) -> float:
        """Weight of the regularizer at this step; at 0 the engine skips computing it unless
        the method has parameters of its own (they need a gradient every step under DDP)."""
        return 0.0

    def regularizer(self, model: nn.Module, task_loss: Tensor, progress: Progress
                    ) -> Tensor | None:
        """The unweighted term the engine adds as `loss = task + lam * regularizer` (the
        task loss is given for methods that differentiate it); None: nothing."""
        return None

    def finalize(self, model: nn.Module, bits: int, calibration: Iterable | None = None
                 ) -> dict[str, Tensor]:
        """Make `model` a plain network (no parametrizations or hooks left) whose quantized
        weights take only grid values, in place; returns each tensor's grid, sorted, at most
        2**bits values. `calibration`: training batches, for methods that need data."""
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: registers a Method subclass under `cls.name`."""
    return METHODS.register(cls.name)(cls)


def create_method(name: str, config: Any = None) -> Method:
    """The method registered as `name`, with `config` (None: its defaults)."""
    return METHODS.get(name)(config)


def list_methods() -> list[str]:
    return METHODS.names()


def check_bits(bits: Any) -> int:
    """`bits` must be an integer from 1 to MAX_BITS."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ConfigError(f"bits must be an integer from 1 to {MAX_BITS}, got {bits!r}")
    return bits


def attach_codebooks(model: nn.Module, grids: dict[str, Tensor]) -> None:
    """Attach a fixed codebook holding `grids[name]` (sorted, distinct) beside each named
    tensor, so that `qareg.convert` and `save_compressed` treat the network like one trained
    with qareg. Tensors that already have a codebook are left alone."""
    candidates = _candidates(model)
    done = {t.name for t in quantized_tensors(model)}
    for name, grid in grids.items():
        if name in done:
            continue
        assert name in candidates, f"no parameter {name!r} in the model"
        module, attribute, param = candidates[name]
        values = grid.detach().double().flatten().unique()  # sorted, distinct
        if values.numel() == 1:  # a codebook needs k >= 2: add an unused neighbour
            values = torch.cat([values, values + max(1.0, values.abs().item()) * 1e-3])
        scale = values.abs().max().item() or 1.0
        codebook = Codebook(values.numel(), scale).to(param.device)
        with torch.no_grad():
            codebook.normalized.copy_((values / scale).float())
        codebook.project_()
        module.add_module(attribute + CODEBOOK_SUFFIX, codebook)


def snap_with(method: Method, model: nn.Module, bits: int | None,
              calibration: Iterable | None = None, bn_max_batches: int | None = None
              ) -> ConversionReport:
    """Finalize `model` with `method` at `bits`, attach the grids as codebooks and run
    `qareg.convert` (batch norm re-estimated on `calibration` when given); in place."""
    grids = method.finalize(model, bits, calibration)
    attach_codebooks(model, grids)
    return convert(model, calibration, bn_max_batches=bn_max_batches)
