"""qareg's own method and the k-means baseline on the harness: both end with codebooks.

- `qareg`: learnable codebooks plus the quantization-aware regularizer (`qareg.penalty`),
  snapped after training.
- `ptq-kmeans`: full-precision training, then per-tensor k-means codebooks (the exact 1-D
  optimum by default) and snapping: Deep Compression's weight sharing.
- `fp`: full-precision training with no quantization: the reference row of a benchmark.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from qareg.cluster1d import INITS
from qareg.config import RegularizerConfig, check_choice
from qareg.methods.base import Method, Progress, register_method
from qareg.quantize import penalty, prepare, quantized_tensors
from qareg.straight_through import straight_through


def _codebook_grids(model: nn.Module) -> dict[str, Tensor]:
    return {t.name: t.codebook.representatives().detach() for t in quantized_tensors(model)}


@register_method
class QaregMethod(Method):
    """Train with `lambda(t) * penalty(model)`; codebooks learn with the weights."""

    name = "qareg"
    config_class = RegularizerConfig

    def prepare(self, model: nn.Module, bits: int | None, seed: int) -> None:
        super().prepare(model, bits, seed)
        c = self.config
        k = c.k if bits is None else 2 ** bits
        prepare(model, k, include=c.include or None, exclude=c.exclude, init=c.init, seed=seed)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        codebooks = [t.codebook.normalized for t in quantized_tensors(model)]
        return [{"params": codebooks, "lr_scale": self.config.codebook_lr_scale}]

    def forward_context(self, model: nn.Module, progress: Progress
                        ) -> AbstractContextManager[Any]:
        """Snapped forward passes (straight-through) in the last `straight_through` of
        training."""
        if self.config.in_straight_through(progress.fraction):
            return straight_through(model)
        return nullcontext()

    def lam(self, progress: Progress) -> float:
        return self.config.lambda_at(progress.fraction)

    def regularizer(self, model: nn.Module, task_loss: Tensor, progress: Progress) -> Tensor:
        c = self.config
        return penalty(model, c.variant, temperature=c.temperature_at(progress.fraction),
                       layer_weights=c.layer_weights)

    def finalize(self, model: nn.Module, bits: int, calibration: Iterable | None = None
                 ) -> dict[str, Tensor]:
        return _codebook_grids(model)  # the learned codebooks stay; convert snaps to them


@dataclass(frozen=True)
class KMeansConfig:
    """Post-training k-means: how the codebooks are found."""

    init: str = "kmeans"  # kmeans: the exact 1-D optimum; or lloyd, kmeans++, quantile, linear

    def __post_init__(self) -> None:
        check_choice("init", self.init, INITS)


@register_method
class PtqKMeansMethod(Method):
    """Full-precision training; k-means codebooks at each bit-width afterwards."""

    name = "ptq-kmeans"
    config_class = KMeansConfig
    post_training = True

    def finalize(self, model: nn.Module, bits: int, calibration: Iterable | None = None
                 ) -> dict[str, Tensor]:
        prepare(model, 2 ** bits, init=self.config.init)
        return _codebook_grids(model)


@dataclass(frozen=True)
class NoConfig:
    """Full precision has nothing to configure."""


@register_method
class FullPrecisionMethod(Method):
    """Plain training, no quantization: the reference of every comparison."""

    name = "fp"
    config_class = NoConfig
    post_training = True

    def finalize(self, model: nn.Module, bits: int, calibration: Iterable | None = None
                 ) -> dict[str, Tensor]:
        raise NotImplementedError("fp is not quantized; it is the reference row")
