"""The parts of qareg, each a method of its own so that every table shows what each earns:

- `qareg-reg`: the regularizer alone, the seed paper's method (Malchiodi, Ferraretto and
  Frasca): learnable codebooks pulled together by the penalty, forward passes through the
  latent weights, lambda ramped linearly to 1000 (its default until snapped forward passes
  were measured; BENCHMARKS.md, "qareg: which regularizer variant").
- `qareg-ste`: snapped forward passes with learned codebooks and no regularizer (lambda 0).

`qareg` itself, the default, is both together (methods/qareg.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from qareg.methods.base import register_method
from qareg.methods.qareg import QaregConfig, QaregMethod


@dataclass(frozen=True)
class RegularizerOnlyConfig(QaregConfig):
    """qareg's options, with the regularizer alone by default."""

    lam: float = 1000.0  # global lambda, ramped linearly from 0
    snapped_fraction: float = 0.0  # no snapped forward passes


@dataclass(frozen=True)
class SnappedOnlyConfig(QaregConfig):
    """qareg's options, with snapped forward passes and no regularizer by default."""

    lam: float = 0.0  # no penalty
    snapped_fraction: float = 1.0  # every forward pass through the snapped weights


@register_method("qareg-reg", config_class=RegularizerOnlyConfig, search_space=(
    {}, {"lam": 100.0}, {"lam": 10000.0}, {"lr": 3e-4}))
class RegularizerOnlyMethod(QaregMethod):
    """The seed paper's method: the quantization-aware regularizer alone."""


@register_method("qareg-ste", config_class=SnappedOnlyConfig, search_space=(
    {}, {"lr": 3e-4}, {"lr": 3e-3}, {"codebook_lr_scale": 0.1}))
class SnappedOnlyMethod(QaregMethod):
    """The ablation: snapped forward passes with learned codebooks, lambda 0."""
