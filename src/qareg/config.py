"""Frozen configuration dataclasses of data and training, validated in `__post_init__`,
with YAML loading.

Each field has a typed default and a comment with its unit. A bad value raises
`ConfigError` naming the field, the value and what is allowed. The CLI maps its flags onto
these fields one to one. Each method's own config lives beside the method (`qareg.methods`).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qareg.data import list_datasets
from qareg.errors import ConfigError
from qareg.models import list_models
from qareg.validate import (
    check_bool,
    check_choice,
    check_device,
    check_float,
    check_folder,
    check_int,
)

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("cosine", "onecycle", "constant")
PRECISIONS = ("fp32", "bf16")


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
    # quantize the input of every Conv and Linear layer at this many bits (2 to 16) with a
    # learned step, in training and after (qareg.act_quant); None: full-precision inputs
    act_bits: int | None = None

    def __post_init__(self) -> None:
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
        if self.act_bits is not None:
            check_int("act_bits", self.act_bits, 2, 16)


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build config `cls` from a mapping; an unknown key is an error listing the valid ones.

    A key renamed in this release (`cls.RENAMED`, old name -> new) still works, with a
    DeprecationWarning.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {values!r}")
    values = dict(values)
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in values:
            warnings.warn(f"{old!r}{' in ' + where if where else ''} is now called {new!r}; "
                          "the old name goes in the next release", DeprecationWarning,
                          stacklevel=2)
            if new in values:
                raise ConfigError(f"{old!r} and {new!r} are one setting (renamed); give {new!r}")
            values[new] = values.pop(old)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid), key=str)  # YAML keys may be numbers too
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))}"
            f"{' in ' + where if where else ''}; valid keys: "
            f"{', '.join(valid) or 'none (it takes no options)'}"
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
    """A YAML config file as a mapping of sections."""
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
