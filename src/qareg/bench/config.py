"""What one `qareg bench` compares: methods, bit-widths, seeds, data, budget and tuning."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qareg.config import DataConfig, TrainConfig
from qareg.errors import ConfigError
from qareg.methods import METHODS, Method, create_method, list_methods
from qareg.validate import check_bits_or_budget, check_float, check_int, is_budget

FP_BITS = 32  # the "bits" of the full-precision reference row


def reference_method() -> str:
    """The name of the registered method that does not quantize: every bench's reference."""
    names = [name for name in list_methods() if not METHODS.get(name).quantizes]
    assert len(names) == 1, f"exactly one reference method must be registered, got {names}"
    return names[0]


def _check_names(name: str, values: Any, valid: list[str]) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{name} must be a non-empty list, one or more of {', '.join(valid)}; "
                          f"got {values!r}")
    for value in values:
        if value not in valid:
            raise ConfigError(f"{name}: unknown {value!r}; valid: {', '.join(valid)}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name} must not repeat a value, got {list(values)!r}")
    return tuple(values)


def _seed(value: Any) -> int:
    check_int("seed", value, 0)
    return value


def _check_numbers(name: str, values: Any, check: Callable[[Any], Any], what: str
                   ) -> tuple[Any, ...]:
    """`values`, a non-empty list of distinct `what`, each as `check` returns it."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{name} must be a non-empty list of {what}, got {values!r}")
    checked = tuple(check(value) for value in values)
    if len(set(checked)) != len(checked):
        raise ConfigError(f"{name} must not repeat a value, got {list(values)!r}")
    return checked


@dataclass(frozen=True)
class BenchConfig:
    """One comparison: which methods, bit-widths and seeds, on what, with what budget."""

    model: str = "lenet5"  # a name from qareg.list_models()
    dataset: str = "fashion-mnist"  # a name from qareg.data.list_datasets()
    # methods compared (registered names); the reference, fp, always runs as well
    methods: tuple[str, ...] = ("ptq-kmeans", "ptq-uniform", "qareg", "qareg-reg", "qareg-ste",
                                "cpq", "gradl1", "lsq", "dkm")
    # bit-widths (k = 2**bits for codebook methods) and fractional budgets of stored bits
    # per weight (e.g. 0.75), run by the methods that take them (`Method.budgets`)
    bits: tuple[int | float, ...] = (1, 2, 3, 4)
    seeds: tuple[int, ...] = (0, 1, 2)  # one network per seed, trained from scratch
    pretrain_epochs: int = 4  # shared full-precision training, per seed (SGD, lr 0.05)
    epochs: int = 3  # every method's own training budget, from the pretrained network
    lr: float | None = None  # every method's learning rate; None: each method's recipe
    pretrain_lr: float = 0.05  # SGD learning rate of the shared pretraining
    batch_size: int = 128  # images per step, in both phases
    data_dir: str | None = None  # dataset folder; None: $QAREG_DATA or the default
    val_size: int = 5000  # training images held out (not trained on; for choices)
    augment: bool = True  # the dataset's usual augmentation, in both phases
    device: str = "cpu"  # cpu, cuda, cuda:N or mps
    method_configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> fields
    # named configurations of a registered method, run as methods of their own: name ->
    # {"method": registered name, field: value, ...}; they take the bench's method_configs
    # of that method, then their fields (e.g. qareg-zero: {method: qareg, zero: true})
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    # trials per training method and bit-width: the first N of its `search_space`, chosen on
    # the validation split of the first seed and kept for the others; 0: no tuning
    tune_trials: int = 0
    # the width at which each method is tuned, its choice then trained at every width;
    # None: every width tuned on its own
    tune_bits: int | None = None
    # quantize every layer input at this many bits while the methods train (qareg.act_quant):
    # W/A benches; the reference stays in full precision, post-training quantizers are skipped
    act_bits: int | None = None
    # a tuned bench's results file: train the choices made there (per method and width)
    # instead of tuning again (for a larger network whose own tuning would not fit)
    tuning_from: str | None = None

    def __post_init__(self) -> None:
        # the fields they share with the data and training configs, checked by them
        DataConfig(dataset=self.dataset, data_dir=self.data_dir, val_size=self.val_size,
                   augment=self.augment)
        TrainConfig(model=self.model, epochs=self.epochs, batch_size=self.batch_size,
                    lr=self.pretrain_lr, device=self.device)
        self._check_variants()
        valid = [m for m in list_methods() if METHODS.get(m).quantizes] + list(self.variants)
        object.__setattr__(self, "methods", _check_names("methods", self.methods, valid))
        object.__setattr__(self, "bits", tuple(sorted(_check_numbers(
            "bits", self.bits, check_bits_or_budget, "bit-widths (or fractional budgets)"))))
        object.__setattr__(self, "seeds", _check_numbers("seeds", self.seeds, _seed, "integers"))
        check_int("pretrain_epochs", self.pretrain_epochs, 0)
        check_float("pretrain_lr", self.pretrain_lr, 0, low_open=True)
        if self.lr is not None:
            check_float("lr", self.lr, 0, low_open=True)
        if not isinstance(self.method_configs, dict):
            raise ConfigError(f"method_configs must map method names to fields, got "
                              f"{self.method_configs!r}")
        for name in self.method_configs:
            if name not in list_methods():
                raise ConfigError(f"method_configs: unknown method {name!r}; valid: "
                                  f"{', '.join(list_methods())}")
            self.method(name)  # validates the fields now, not after hours of training
        check_int("tune_trials", self.tune_trials, 0)
        if self.act_bits is not None:
            check_int("act_bits", self.act_bits, 2, 16)
        if self.tune_bits is not None and self.tune_bits not in self.bits:
            raise ConfigError(f"tune_bits {self.tune_bits!r} must be one of the bench's bits "
                              f"{list(self.bits)}")
        if self.tuning_from is not None:
            if self.tune_trials:
                raise ConfigError(f"give tune_trials ({self.tune_trials}) or tuning_from "
                                  f"({self.tuning_from!r}), not both")
            if not Path(self.tuning_from).is_file():
                raise ConfigError(f"tuning_from: {self.tuning_from!r} is not a results file")
        for name in self.variants:
            self.method(name)  # a variant's fields are validated now
        for name in self.tuned_methods():
            space = self.method_class(name).search_space
            if len(space) < self.tune_trials:
                raise ConfigError(f"tune_trials={self.tune_trials}: method {name!r} has "
                                  f"{len(space)} candidates in its search_space; give at most "
                                  f"{len(space)}, or 0 for no tuning")
            for choice in self.candidates(name):
                self.method(name, choice)  # every candidate is a valid config

    def _check_variants(self) -> None:
        if not isinstance(self.variants, dict):
            raise ConfigError(f"variants must map names to {{method: NAME, field: value}}, got "
                              f"{self.variants!r}")
        registered = [m for m in list_methods() if METHODS.get(m).quantizes]
        for name, fields in self.variants.items():
            if not isinstance(name, str) or name in list_methods():
                raise ConfigError(f"variants: {name!r} must be a new name, not a registered "
                                  f"method ({', '.join(list_methods())})")
            if not isinstance(fields, dict) or fields.get("method") not in registered:
                raise ConfigError(f"variants: {name!r} must give method: one of "
                                  f"{', '.join(registered)}; got {fields!r}")

    def base_name(self, name: str) -> str:
        """The registered method behind `name` (itself, or a variant's method)."""
        return self.variants[name]["method"] if name in self.variants else name

    def method_class(self, name: str) -> type[Method]:
        """The class of method or variant `name`."""
        return METHODS.get(self.base_name(name))

    def method(self, name: str, choice: dict[str, Any] | None = None) -> Method:
        """A fresh instance of method (or variant) `name` with this bench's config for it,
        and the options of a tuning `choice` over it (its "lr", if any, goes to the
        training). A variant's instance carries the variant's name, which its rows get."""
        options = {key: value for key, value in (choice or {}).items() if key != "lr"}
        base = self.base_name(name)
        own = {k: v for k, v in self.variants.get(name, {}).items() if k != "method"}
        method = create_method(base, {**self.method_configs.get(base, {}), **own, **options})
        if name != base:
            method.name = name  # shadows the registered name for this instance
        return method

    def runs_at(self, name: str, bits: int | float) -> bool:
        """Whether method `name` runs at `bits`: a fractional budget only if it takes one;
        with quantized activations, only if it trains."""
        cls = self.method_class(name)
        if self.act_bits is not None and cls.trains_in_full_precision():
            return False
        return not is_budget(bits) or cls.budgets

    def skipped(self) -> list[tuple[str, float]]:
        """(method, bits) pairs left out: budgets a method cannot take, and post-training
        quantizers when activations are quantized (they do not train with them)."""
        return [(m, b) for m in self.methods for b in self.bits if not self.runs_at(m, b)]

    def tuned_methods(self) -> list[str]:
        """The methods this bench tunes (or takes tuned choices for, with `tuning_from`):
        those that train."""
        if not self.tune_trials and self.tuning_from is None:
            return []
        return [name for name in self.methods
                if not self.method_class(name).trains_in_full_precision()]

    def candidates(self, name: str) -> list[dict[str, Any]]:
        """The choices tried for method `name`: one untuned ({}) when it is not tuned."""
        if name not in self.tuned_methods() or not self.tune_trials:
            return [{}]
        space = self.method_class(name).search_space
        return [dict(choice) for choice in space[:self.tune_trials]]

    def pretraining(self, seed: int) -> TrainConfig:
        return TrainConfig(model=self.model, epochs=self.pretrain_epochs, optimizer="sgd",
                           lr=self.pretrain_lr, batch_size=self.batch_size, seed=seed,
                           device=self.device)

    def method_training(self, method: Method, seed: int, choice: dict[str, Any] | None = None
                        ) -> TrainConfig:
        """The recipe `method` trains with: its own (`Method.recipe`), this bench's epochs,
        batch size and seed, `lr` when given, and the lr of a tuning `choice`."""
        recipe = {**method.recipe, **({"lr": self.lr} if self.lr is not None else {})}
        if choice and "lr" in choice:
            recipe["lr"] = choice["lr"]
        act_bits = self.act_bits if method.quantizes else None  # the reference: full precision
        return TrainConfig(model=self.model, epochs=self.epochs, batch_size=self.batch_size,
                           seed=seed, device=self.device, act_bits=act_bits, **recipe)

    def recipe(self) -> dict[str, Any]:
        """What every row of one results file must share (checked when resuming)."""
        keep = ("model", "dataset", "pretrain_epochs", "epochs", "lr", "pretrain_lr",
                "batch_size", "val_size", "augment")
        recipe = {k: getattr(self, k) for k in keep}
        if self.tune_trials:  # absent when 0, so files of untuned benches stay readable
            recipe["tune_trials"] = self.tune_trials
        if self.tune_bits is not None:
            recipe["tune_bits"] = self.tune_bits
        if self.act_bits is not None:
            recipe["act_bits"] = self.act_bits
        if self.tuning_from is not None:
            recipe["tuning_from"] = Path(self.tuning_from).name
        return recipe
