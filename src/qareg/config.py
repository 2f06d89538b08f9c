"""Frozen configuration dataclasses, validated in `__post_init__`, with YAML loading.

Each field has a typed default and a comment with its unit. A bad value raises
`ConfigError` naming the field, the value and what is allowed. The CLI maps its flags onto
these fields one to one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qareg.cluster1d import INITS
from qareg.errors import ConfigError
from qareg.penalties import VARIANTS
from qareg.quantize import MAX_K

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("cosine", "onecycle", "constant")
PRECISIONS = ("fp32", "bf16")
LAMBDA_SCHEDULES = ("constant", "linear", "cosine", "exponential")


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"from {low} to {high}"
        raise ConfigError(f"{name} must be an integer {allowed}, got {value!r}")


def check_float(
    name: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        allowed = bound if high is None else f"{bound} and <= {high}"
        raise ConfigError(f"{name} must be a number {allowed}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):  # YAML's "yes" in quotes, or 1, would pass as truthy
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def check_folder(name: str, value: Any) -> None:
    """`value` must be None or a non-empty folder name (whether it exists is the loader's
    business: it names the files it looked for)."""
    if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
        raise ConfigError(f"{name} must be a folder name, or null for the default; got {value!r}")


DEVICE_FORMS = "cpu, cuda, cuda:N, mps"


def check_device(name: str, value: Any) -> None:
    """`value` must be a device this machine has: cpu, cuda, cuda:N or mps."""
    match = re.fullmatch(r"(cpu|mps|cuda)(?::(\d+))?", value) if isinstance(value, str) else None
    if match is None or (match[2] is not None and match[1] != "cuda"):
        raise ConfigError(f"{name} must be a device, one of {DEVICE_FORMS}; got {value!r}")
    if match[1] == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{name} {value!r}: CUDA is not available on this machine; "
                              "use --device cpu")
        if match[2] is not None and int(match[2]) >= count:
            raise ConfigError(f"{name} {value!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    if match[1] == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{name} {value!r}: MPS is not available on this machine; "
                          "use --device cpu")


@dataclass(frozen=True)
class DataConfig:
    """Which data, and how the validation split is carved."""

    dataset: str = "fashion-mnist"  # a name from qareg.data.list_datasets()
    data_dir: str | None = None  # folder of the files; None: $QAREG_DATA or the default
    download: bool = False  # fetch CIFAR-10 from its official address if missing
    val_size: int = 5000  # images carved from the training set for choices
    split_seed: int = 0  # seed of the validation split
    augment: bool = True  # the dataset's usual augmentation (crop + flip for CIFAR-10)

    def __post_init__(self) -> None:
        from qareg.data import list_datasets

        check_choice("dataset", self.dataset, tuple(list_datasets()))
        check_folder("data_dir", self.data_dir)
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", str(self.data_dir))  # a Path: JSON-friendly
        check_bool("download", self.download)
        check_int("val_size", self.val_size, 0)
        check_int("split_seed", self.split_seed, 0)
        check_bool("augment", self.augment)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe shared by full-precision and regularized training."""

    model: str = "lenet5"  # a name from qareg.list_models()
    epochs: int = 10  # passes over the training split
    batch_size: int = 128  # images per step
    optimizer: str = "sgd"  # sgd (with momentum) or adam
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9  # SGD momentum (Adam: beta1)
    weight_decay: float = 5e-4  # L2 on the network's parameters; never on codebooks
    lr_schedule: str = "cosine"  # cosine, onecycle or constant, stepped every batch
    seed: int = 0  # model initialisation and batch order
    device: str = "cpu"  # cpu, cuda, cuda:N or mps; must exist on this machine
    bn_batches: int = 50  # training batches to re-estimate batch norm after convert
    precision: str = "fp32"  # fp32, or bf16: forward passes under bfloat16 autocast
    deterministic: bool = False  # deterministic kernels only (torch.use_deterministic_algorithms)

    def __post_init__(self) -> None:
        from qareg.models import list_models

        check_choice("model", self.model, tuple(list_models()))
        check_int("epochs", self.epochs, 0)
        check_int("batch_size", self.batch_size, 1)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_float("lr", self.lr, 0, low_open=True)
        check_float("momentum", self.momentum, 0, 1)
        check_float("weight_decay", self.weight_decay, 0)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_int("seed", self.seed, 0)
        check_device("device", self.device)
        check_int("bn_batches", self.bn_batches, 1)
        check_choice("precision", self.precision, PRECISIONS)
        check_bool("deterministic", self.deterministic)


@dataclass(frozen=True)
class RegularizerConfig:
    """The quantization-aware regularizer: codebooks, penalty and lambda schedule."""

    k: int = 4  # representatives per quantized tensor (any k >= 2)
    init: str = "kmeans"  # codebook init: linear, quantile, kmeans++, kmeans (exact) or lloyd
    variant: str = "hard"  # penalty: hard (squared), soft (soft-min) or abs (absolute)
    temperature: float = 0.05  # soft variant only, at the start; in units of scale squared
    temperature_final: float | None = None  # soft: anneal geometrically to this; None: fixed
    lam: float = 1.0  # global lambda: loss = task + lambda(t) * sum of per-tensor terms
    lam_schedule: str = "linear"  # lambda(t): constant, or a linear, cosine or exponential ramp
    lam_start: float = 1e-3  # exponential ramp only: it starts at lam * lam_start
    ramp: float = 1.0  # fraction of training over which lambda ramps to `lam`
    codebook_lr_scale: float = 1.0  # codebook learning rate = lr * this
    # (`qareg.straight_through`: straight-through gradients to weights and codebooks)
    straight_through: float = 1.0  # last fraction of training run on snapped weights; 0: none
    straight_through_lam: float | None = None  # lambda in that phase; None: the schedule's
    include: tuple[str, ...] = ()  # glob patterns of tensors; empty: Conv and Linear weights
    exclude: tuple[str, ...] = ()  # glob patterns of tensors left in full precision
    layer_weights: dict[str, float] = field(default_factory=dict)  # pattern -> term weight

    def __post_init__(self) -> None:
        check_int("k", self.k, 2, MAX_K)
        check_choice("init", self.init, INITS)
        check_choice("variant", self.variant, VARIANTS)
        check_float("temperature", self.temperature, 0, low_open=True)
        if self.temperature_final is not None:
            check_float("temperature_final", self.temperature_final, 0, low_open=True)
            if self.variant != "soft":  # would be ignored: only the soft-min has a temperature
                raise ConfigError(f"temperature_final only applies with variant soft; variant "
                                  f"is {self.variant!r}")
        check_float("lam", self.lam, 0)
        check_choice("lam_schedule", self.lam_schedule, LAMBDA_SCHEDULES)
        check_float("ramp", self.ramp, 0, 1, low_open=True)
        check_float("lam_start", self.lam_start, 0, 1, low_open=True)
        check_float("codebook_lr_scale", self.codebook_lr_scale, 0)
        check_float("straight_through", self.straight_through, 0, 1)
        if self.straight_through_lam is not None:
            check_float("straight_through_lam", self.straight_through_lam, 0)
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{name} must be a list of glob patterns, got {value!r}")
            if "" in value:
                raise ConfigError(f"{name} has an empty pattern in {list(value)!r}; give glob "
                                  "patterns such as 'features.*.weight'")
            object.__setattr__(self, name, tuple(value))
        if not isinstance(self.layer_weights, dict):
            raise ConfigError(f"layer_weights must map patterns to numbers, got "
                              f"{self.layer_weights!r}")
        for pattern, weight in self.layer_weights.items():
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"layer_weights keys must be non-empty glob patterns, got "
                                  f"{pattern!r}")
            check_float(f"layer_weights[{pattern!r}]", weight, 0)

    def temperature_at(self, progress: float) -> float:
        """Soft-min temperature at `progress` in [0, 1] of training (geometric annealing)."""
        if self.temperature_final is None:
            return self.temperature
        return self.temperature * (self.temperature_final / self.temperature) ** progress

    def in_straight_through(self, progress: float) -> bool:
        """Whether `progress` in [0, 1) of training falls in the straight-through phase."""
        return progress >= 1 - self.straight_through

    def lambda_at(self, progress: float) -> float:
        """lambda at `progress` in [0, 1] of training, following `lam_schedule` (and
        `straight_through_lam` in the straight-through phase, when given)."""
        if self.straight_through_lam is not None and self.in_straight_through(progress):
            return self.straight_through_lam
        if self.lam_schedule == "constant":
            return self.lam
        ramp = min(1.0, progress / self.ramp)
        if self.lam_schedule == "linear":
            return self.lam * ramp
        if self.lam_schedule == "exponential":  # equal time in every decade of lambda
            return self.lam * self.lam_start ** (1 - ramp)
        return self.lam * (1 - math.cos(math.pi * ramp)) / 2


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build config `cls` from a mapping; an unknown key is an error listing the valid ones."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {values!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid), key=str)  # YAML keys may be numbers too
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))}"
            f"{' in ' + where if where else ''}; valid keys: {', '.join(valid)}"
        )
    return cls(**values)


def _strict_yaml_loader() -> type:
    """yaml.SafeLoader that rejects duplicate keys (the last would silently win) and reads
    1e-3 as a number (YAML 1.1 reads it as text unless written 1.0e-3)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: the base class reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}", key_node.start_mark)
            return super().construct_mapping(node, deep)

    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return StrictLoader


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping (sections data, train, regularizer)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text: {error}") from None
    try:
        values = yaml.load(text, Loader=_strict_yaml_loader()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return values


def as_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-friendly values."""
    out = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
