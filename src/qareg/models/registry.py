"""The model registry: `register_model`, `create_model`, `list_models`, and the helpers the
architecture files share. A leaf of `qareg.models`: the architecture files import it, and
`qareg.models` imports them (timm's `_registry.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from qareg.errors import ConfigError
from qareg.registry import Registry

MODELS: Registry = Registry("model")
register_model = MODELS.register

# Largest image side any model accepts: guards against passing e.g. a flattened 784 by mistake.
MAX_INPUT_SIZE = 256


def check_args(num_classes: int, in_channels: int, input_size: int, min_input_size: int) -> None:
    """Raise `ConfigError` naming the first constructor argument outside its allowed range."""
    limits = {
        "num_classes": (num_classes, 2, None),
        "in_channels": (in_channels, 1, None),
        "input_size": (input_size, min_input_size, MAX_INPUT_SIZE),
    }
    for name, (value, lo, hi) in limits.items():
        # bool is an int subclass but never a meaningful size
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or value < lo or (hi is not None and value > hi):
            allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise ConfigError(f"{name}={value!r} is not allowed; expected an integer {allowed}")


def feature_count(features: nn.Module, in_channels: int, input_size: int) -> int:
    """Number of values `features` yields for one image, by a dry forward in eval mode.

    Eval mode keeps batch-norm running statistics untouched and allows 1x1 feature maps.
    """
    was_training = features.training
    features.eval()
    with torch.no_grad():
        n = features(torch.zeros(1, in_channels, input_size, input_size)).numel()
    features.train(was_training)
    assert n > 0, f"empty feature map for in_channels={in_channels}, input_size={input_size}"
    return n


def init_conv_bn(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convolutions; batch norm at weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def create_model(
    name: str, num_classes: int = 10, in_channels: int = 3, input_size: int = 32
) -> nn.Module:
    """Build model `name`; its arguments are kept in `model.qareg_model_spec` for rebuilding."""
    constructor = MODELS.get(name)
    model = constructor(num_classes, in_channels, input_size)
    model.qareg_model_spec = {
        "name": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": input_size,
    }
    return model


def list_models() -> list[str]:
    """Sorted names of the registered models."""
    return MODELS.names()
