"""`ptq-uniform`: full-precision training, then symmetric uniform quantization of the
weights at each bit-width (`qareg.uniform`): the fixed-point baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qareg.errors import ConfigError
from qareg.methods.base import Calibration, Grids, Method, register_method
from qareg.uniform import MAX_CLIP_RATIOS, quantize_weights_
from qareg.validate import check_bits, check_bool, check_int


@dataclass(frozen=True)
class UniformConfig:
    """Post-training symmetric uniform quantization of the weights."""

    per_channel: bool = False  # one scale per output channel: refused (see __post_init__)
    clip_ratios: int = 100  # MSE scale search over clipping ratios i/n of max|w|; 1: max-abs

    def __post_init__(self) -> None:
        check_bool("per_channel", self.per_channel)
        check_int("clip_ratios", self.clip_ratios, 1, MAX_CLIP_RATIOS)
        if self.per_channel:  # the harness keeps one codebook of at most 2**bits per tensor
            raise ConfigError(
                "ptq-uniform: per_channel=True cannot be finalized: the harness stores one "
                "codebook of at most 2**bits values per tensor, and per-channel scales give up "
                "to channels * 2**bits distinct values; use per_channel=False here, or "
                "qareg.uniform.quantize_weights_(..., per_channel=True) / "
                "bit_width_sweep(per_channel=True) to measure per-channel accuracy")


@register_method("ptq-uniform", config_class=UniformConfig, post_training=True)
class PtqUniformMethod(Method):
    """Full-precision training; symmetric uniform quantization at each bit-width afterwards."""

    def finalize(self, model: nn.Module, bits: int, calibration: Calibration = None) -> Grids:
        check_bits(bits)
        return quantize_weights_(model, bits, clip_ratios=self.config.clip_ratios)
