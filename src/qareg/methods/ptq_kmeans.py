"""`ptq-kmeans`: full-precision training, then per-tensor k-means codebooks at each
bit-width and snapping (Deep Compression's weight sharing)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qareg.methods.base import Calibration, Grids, Method, register_method
from qareg.quantize import prepare, quantized_tensors
from qareg.validate import check_init


@dataclass(frozen=True)
class KMeansConfig:
    """Post-training k-means: how the codebooks are found."""

    init: str = "kmeans-exact"  # the exact 1-D optimum; or kmeans-lloyd, kmeans++, ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "init", check_init("init", self.init))


@register_method("ptq-kmeans", config_class=KMeansConfig, post_training=True)
class PtqKMeansMethod(Method):
    """Full-precision training; k-means codebooks at each bit-width afterwards."""

    def finalize(self, model: nn.Module, bits: int, calibration: Calibration = None) -> Grids:
        prepare(model, 2 ** bits, init=self.config.init)
        return {t.name: t.codebook.representatives().detach() for t in quantized_tensors(model)}
