"""Checks of single values, each raising `ConfigError` that names the value and what is
allowed. Config dataclasses call them in `__post_init__`; so do functions taking user input.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any

import torch

from qareg.constants import INITS, MAX_BITS, RENAMED_INITS
from qareg.errors import ConfigError

DEVICE_FORMS = "cpu, cuda, cuda:N, mps"


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


def check_patterns(name: str, value: Any) -> tuple[str, ...]:
    """`value` must be a list of non-empty glob patterns; returns it as a tuple."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{name} must be a list of glob patterns, got {value!r}")
    if "" in value:
        raise ConfigError(f"{name} has an empty pattern in {list(value)!r}; give glob "
                          "patterns such as 'features.*.weight'")
    return tuple(value)


def check_bits(bits: Any, name: str = "bits") -> int:
    """`bits` must be an integer from 1 to MAX_BITS; returns it."""
    check_int(name, bits, 1, MAX_BITS)
    return bits


def is_budget(bits: Any) -> bool:
    """Whether `bits` is a fractional budget (stored bits per weight, e.g. 0.75) rather
    than a whole bit-width."""
    return isinstance(bits, float) and not bits.is_integer()


def check_bits_or_budget(bits: Any, name: str = "bits") -> int | float:
    """A whole bit-width from 1 to MAX_BITS (a float such as 2.0 becomes 2), or a fractional
    budget of stored bits per weight between 0 and MAX_BITS; returns it."""
    if isinstance(bits, float) and bits.is_integer():
        bits = int(bits)
    if isinstance(bits, float):
        check_float(name, bits, 0, MAX_BITS, low_open=True)
        return bits
    return check_bits(bits, name)


def bits_from_text(text: str) -> int | float:
    """A command-line bit-width or budget, not yet range-checked: "2" -> 2, "0.75" -> 0.75."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"bits must be a whole bit-width (1 to {MAX_BITS}) or a fractional "
                          f"budget such as 0.75, got {text!r}") from None
    return int(value) if value.is_integer() else value


def check_init(name: str, value: Any) -> str:
    """A codebook initialisation from `INITS`; the names of the last release ("kmeans",
    "lloyd") still work, with a DeprecationWarning. Returns the current name."""
    if isinstance(value, str) and value in RENAMED_INITS:
        warnings.warn(f"{name} {value!r} is now called {RENAMED_INITS[value]!r}; the old name "
                      "goes in the next release", DeprecationWarning, stacklevel=3)
        return RENAMED_INITS[value]
    check_choice(name, value, INITS)
    return value


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
