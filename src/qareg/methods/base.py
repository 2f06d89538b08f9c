"""The harness every compression method plugs into: one interface, one registry.

A method is one file: a config dataclass plus a `Method` subclass decorated with
`register_method`. The training engine, `qareg train` and `qareg bench` treat every method
alike, and learn what they need from the class (`post_training`, `quantizes`, `recipe`):

1. `prepare(model, bits, seed)` attaches what training needs: codebooks, learnable
   quantizers (as `torch.nn.utils.parametrize` parametrizations of the weights), hooks.
2. Training: the forward pass runs in `forward_context`, and the engine writes
   `loss = task + method.lam(t) * method.regularizer(...)` on one line; the method's own
   parameters (`param_groups`) get no weight decay and their own learning-rate scale.
3. `convert(model, bits, calibration)` makes the trained network a quantized one:
   `finalize` leaves a plain network whose selected weights hold only the values of a
   small grid and returns that grid per tensor; the harness attaches the grids as
   codebooks and runs `qareg.convert` (batch norm re-estimated on `calibration`), so every
   method ends in the same form: the same accuracy check, report and compressed file.

The smallest method, the public extension contract: a post-training method
(`post_training = True`) with a `name` that implements only
`finalize(model, bits, calibration)`, returning each quantized tensor's grid by name.
Post-training methods train without knowing the bit-width (`prepare(model, None, seed)`)
and are converted at every bit-width from copies of the same trained network.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from qareg.codebook import Codebook
from qareg.config import from_dict
from qareg.constants import CODEBOOK_SUFFIX, MAX_BITS
from qareg.errors import ConfigError
from qareg.quantize import ConversionReport, convert, parameter_candidates, quantized_tensors
from qareg.registry import Registry
from qareg.validate import check_bits_or_budget, is_budget


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


@dataclass(frozen=True)
class NoOptions:
    """The config of a method with nothing to configure."""


Grids = dict[str, Tensor]  # tensor name -> its sorted grid values (what `finalize` returns)
Calibration = Iterable | None  # training batches, for methods that need data

# The hooks a method overrides when its training differs from plain full-precision training.
TRAINING_HOOKS = ("prepare", "param_groups", "forward_context", "lam", "regularizer")


class Method:
    """One compression method on the common harness (see the module docstring)."""

    name: ClassVar[str]  # the registry name, e.g. "lsq"
    config_class: ClassVar[type] = NoOptions  # frozen dataclass, validated in __post_init__
    post_training: ClassVar[bool] = False  # True: trains once, converted at any bits afterwards
    quantizes: ClassVar[bool] = True  # False only for the full-precision reference
    # TrainConfig fields of this method's recommended fine-tuning, used by `qareg train
    # --init-from` and by `qareg bench`; training from scratch keeps TrainConfig's defaults.
    recipe: ClassVar[dict[str, Any]] = {"optimizer": "adam", "lr": 1e-3}
    # True: `bits` may also be a fractional budget of stored bits per weight (e.g. 0.75)
    budgets: ClassVar[bool] = False
    # What `qareg bench --tune-trials N` tries, the first N in this order, chosen on the
    # validation split: each a dict of this method's options and/or "lr" (the fine-tuning
    # learning rate); {} is the options as configured. Documented hyperparameters only.
    search_space: ClassVar[tuple[dict[str, Any], ...]] = ()

    def __init__(self, config: Any = None) -> None:
        if config is None:
            config = self.config_class()
        elif isinstance(config, dict):
            config = from_dict(self.config_class, config, f"the options of method {self.name!r}")
        if not isinstance(config, self.config_class):
            raise ConfigError(f"method {self.name!r} takes a {self.config_class.__name__}, got "
                              f"{type(config).__name__}")
        self.config = config
        self.bits: int | None = None  # set by prepare

    @classmethod
    def trains_in_full_precision(cls) -> bool:
        """Whether training with this method is plain full-precision training (it overrides
        none of the training hooks), so that one such training serves all these methods."""
        return all(getattr(cls, hook) is getattr(Method, hook) for hook in TRAINING_HOOKS)

    def resolve_bits(self, bits: int | float | None) -> int | float | None:
        """The bit-width this method trains or is converted at, given the one asked for:
        a quantizing method needs one, from 1 to MAX_BITS (or a fractional budget, for the
        methods that take one); the reference takes none."""
        if not self.quantizes:
            if bits is not None:
                raise ConfigError(f"method {self.name!r} does not quantize; drop bits={bits}")
            return None
        if bits is None:
            raise ConfigError(f"method {self.name!r} needs bits (1 to {MAX_BITS})")
        bits = check_bits_or_budget(bits)
        if is_budget(bits) and not self.budgets:
            takers = [n for n in list_methods() if METHODS.get(n).budgets]
            raise ConfigError(f"method {self.name!r} takes whole bit-widths (1 to {MAX_BITS}), "
                              f"not a budget of {bits} bits per weight; fractional budgets: "
                              f"{', '.join(takers)}")
        return bits

    def prepare(self, model: nn.Module, bits: int | None, seed: int) -> None:
        """Attach what training needs to `model`, in place. `bits` is None for post-training
        methods, which learn without knowing the bit-width."""
        self.bits = bits

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

    def input_quantizer(self, bits: int, signed: bool, step: float) -> nn.Module | None:
        """This method's own quantizer of a layer's input at `bits` (`signed` grid, `step`
        calibrated), when it trains with quantized activations (`TrainConfig.act_bits`);
        None: the shared learned-step one (`qareg.act_quant.InputQuantizer`)."""
        return None

    def check_act_bits(self, act_bits: int | None) -> None:
        """Refuse a training whose activation bits (None: full precision) this method's
        options cannot work with; by default any."""

    def training_state(self) -> dict[str, Any]:
        """What this method has learned outside the model and the optimizer that a resumed
        training needs (saved in every epoch's checkpoint; plain values only); by default
        nothing."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Take back `training_state`'s dict when a training resumes (after `prepare`)."""

    def lam(self, progress: Progress) -> float:
        """Weight of the regularizer at this step; at 0 the engine skips computing it unless
        the method has parameters of its own (they need a gradient every step under DDP)."""
        return 0.0

    def regularizer(self, model: nn.Module, task_loss: Tensor, progress: Progress
                    ) -> Tensor | None:
        """The unweighted term the engine adds as `loss = task + lam * regularizer` (the
        task loss is given for methods that differentiate it); None: nothing."""
        return None

    def finalize(self, model: nn.Module, bits: int, calibration: Calibration = None) -> Grids:
        """Make `model` a plain network (no parametrizations or hooks left) whose quantized
        weights take only grid values, in place; returns each tensor's grid, sorted, at most
        2**bits values. `calibration`: training batches, for methods that need data."""
        raise NotImplementedError(f"method {self.name!r} implements no finalize")

    def convert(self, model: nn.Module, bits: int | None = None, calibration: Calibration = None,
                bn_max_batches: int | None = None) -> ConversionReport:
        """Make the trained `model` a quantized one, in place: `finalize` at `bits` (default:
        the bits it was prepared for), the grids attached as codebooks, then `qareg.convert`
        with batch norm re-estimated on `calibration` when given."""
        if not self.quantizes:
            raise ConfigError(f"method {self.name!r} does not quantize: it is the "
                              "full-precision reference")
        bits = self.resolve_bits(self.bits if bits is None else bits)
        grids = self.finalize(model, bits, calibration)
        attach_codebooks(model, grids)
        return convert(model, calibration, bn_max_batches=bn_max_batches)

    def options(self) -> dict[str, Any]:
        """The config as plain JSON-friendly values."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self.config).items()}


METHODS: Registry[type[Method]] = Registry("method")


def register_method(target: type[Method] | str | None = None, **attributes: Any) -> Any:
    """Class decorator: registers a Method subclass under its `name`.

    Bare, `@register_method`, the class sets `name`, `config_class`, `post_training`...
    as class attributes; with arguments, `@register_method("lsq", config_class=LSQConfig)`,
    the arguments set them. The same class loaded again (a plug-in file imported twice)
    replaces its entry; another class may not take a registered name.
    """
    if isinstance(target, type):
        return _register(target)
    if target is not None:
        attributes["name"] = target

    def decorate(cls: type[Method]) -> type[Method]:
        declared = {k for c in cls.__mro__ for k in vars(c).get("__annotations__", {})}
        for key, value in attributes.items():
            if not hasattr(cls, key) and key not in declared:
                raise ConfigError(f"register_method: {cls.__name__} has no attribute {key!r} "
                                  f"to set; it declares {', '.join(sorted(declared))}")
            setattr(cls, key, value)
        return _register(cls)

    return decorate


def _register(cls: type[Method]) -> type[Method]:
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise ConfigError(f"method class {cls.__name__} needs a `name`, e.g. name = 'mine'")
    if not (isinstance(cls.config_class, type) and dataclasses.is_dataclass(cls.config_class)):
        raise ConfigError(f"method {cls.name!r}: config_class must be a dataclass, got "
                          f"{cls.config_class!r}")
    if cls.name in METHODS and _origin(METHODS.get(cls.name)) != _origin(cls):
        known = METHODS.get(cls.name)
        raise ConfigError(f"method name {cls.name!r} is taken by {known.__module__}."
                          f"{known.__qualname__}; give {cls.__qualname__} another name")
    METHODS.replace(cls.name, cls)
    return cls


def _origin(cls: type) -> tuple[str, str | None]:
    """Where a class is defined: the same definition loaded again (a plug-in file imported
    twice, under two module names) has the same origin."""
    try:
        source = inspect.getsourcefile(cls)
    except TypeError:
        source = None
    return cls.__qualname__, os.path.realpath(source) if source else cls.__module__


def create_method(name: str, config: Any = None) -> Method:
    """The method registered as `name`, with `config` (a config instance, a mapping of its
    fields, or None for its defaults)."""
    return METHODS.get(name)(config)


def list_methods() -> list[str]:
    """Sorted names of the registered methods."""
    return METHODS.names()


def snap_with(method: Method, model: nn.Module, bits: int | None,
              calibration: Calibration = None, bn_max_batches: int | None = None
              ) -> ConversionReport:
    """Deprecated name of `method.convert(model, bits, calibration, bn_max_batches)`; it
    goes in the next release."""
    warnings.warn("qareg.methods.snap_with(method, model, ...) is now "
                  "method.convert(model, ...); the old name goes in the next release",
                  DeprecationWarning, stacklevel=2)
    return method.convert(model, bits, calibration, bn_max_batches)


def attach_codebooks(model: nn.Module, grids: Grids) -> None:
    """Attach a fixed codebook holding `grids[name]` (sorted, distinct) beside each named
    tensor, so that `qareg.convert` and `save_compressed` treat the network like one trained
    with qareg. Tensors that already have a codebook are left alone."""
    candidates = parameter_candidates(model)
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
