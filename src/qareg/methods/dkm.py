"""DKM: differentiable k-means clustering of weights (Cho et al., ICLR 2022).

The method behind the palettization of Apple's coremltools. In every forward pass each
weight is replaced by a soft mix of k centroids, weighted by an attention over its distances
to them; the task loss then trains weights and centroids together, with no penalty term.
The attention is an N x k matrix per tensor, kept for backward: k times the memory of the
weights, the cost that `benchmarks/regularizer_cost.py` sets beside qareg's penalty.

The method `dkm` (`DKMMethod`) puts `dkm_soft_weights` in a `torch.nn.utils.parametrize`
parametrization of each selected weight, with k = 2**bits centroids per tensor, and at the
end snaps every weight to its nearest centroid. Choices:
- Centroids are free parameters trained by the task loss, started by k-means on the
  weights (the exact 1-D optimum by default) and stored, like qareg's codebooks, in units of
  the tensor's RMS, so one learning rate suits every layer. The paper and coremltools
  instead recompute them in every forward pass by a few attention-weighted k-means
  iterations from the previous ones, back-propagating through those iterations.
- Temperature: T = tau * the mean squared gap between neighbouring initial centroids, fixed
  for the run (a buffer, so it is saved with the model). A weight sitting on a centroid
  then gives its neighbour a share of about exp(-1 / tau) in every layer and at every k;
  coremltools uses an absolute T (1e-4), which suits only weights of one scale.
- Default tau = 0.1, chosen on Fashion-MNIST validation (the evidence: BENCHMARKS.md,
  "Defaults of the rival methods"); a tuned bench also tries 0.03, 0.3 and 1 at each width,
  since the best temperature depends on k.
- At most as many centroids as the tensor has weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qareg.codebook import Codebook
from qareg.methods.base import register_method
from qareg.methods.parametrized import ParametrizedMethod, QuantizerOptions
from qareg.nearest import assign
from qareg.validate import check_bits, check_float, check_init


def dkm_attention(weights: Tensor, centroids: Tensor, temperature: float | Tensor) -> Tensor:
    """(N, k) attention of every weight over the centroids: softmax_j(-(w - c_j)^2 / T).

    `temperature` (a number or a scalar tensor) is in squared weight units; as it falls,
    each row tends to a one-hot vector on the nearest centroid.
    """
    assert centroids.dim() == 1, f"centroids must be 1-D, got {tuple(centroids.shape)}"
    if not isinstance(temperature, Tensor):  # a tensor is not checked: that would sync a GPU
        assert temperature > 0, f"temperature must be positive, got {temperature}"
    distances = (weights.reshape(-1, 1) - centroids).square()  # (N, k)
    return torch.softmax(distances / -temperature, dim=1)  # (N, k), rows sum to one


def dkm_soft_weights(weights: Tensor, centroids: Tensor, temperature: float | Tensor
                     ) -> Tensor:
    """`weights` with each entry replaced by its attention-weighted mix of centroids.

    Differentiable in both `weights` and `centroids`.
    """
    attention = dkm_attention(weights, centroids, temperature)  # (N, k)
    return (attention @ centroids).view_as(weights)  # (N,) -> weights' shape


def relative_temperature(centroids: Tensor, tau: float) -> float:
    """`tau` times the mean squared gap between neighbouring sorted centroids (squared weight
    units): a weight sitting on a centroid then gives its neighbour a share of about
    exp(-1 / tau) at any k and in any layer."""
    c = centroids.detach().double().sort().values  # (k,)
    gaps_sq = c.diff().square().mean().item()
    assert gaps_sq > 0, f"centroids must not all be equal, got {c.tolist()}"
    return tau * gaps_sq


class DKMQuantizer(nn.Module):
    """Parametrization of one weight tensor: its DKM soft weights over learned centroids."""

    def __init__(self, weights: Tensor, bits: int, config: DKMConfig,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        k = max(2, min(2 ** check_bits(bits), weights.numel()))  # no more centroids than weights
        # (k,) centroids stored in units of the tensor's RMS, like qareg's codebooks, so one
        # learning rate suits every layer; not kept sorted during training.
        self.codebook = Codebook.fit(weights.detach(), k, config.init, generator)
        # Fixed softmax temperature in squared weight units (`relative_temperature`).
        temperature = relative_temperature(self.codebook.representatives(), config.tau)
        self.register_buffer("temperature", torch.tensor(temperature, dtype=weights.dtype,
                                                         device=weights.device))

    def centroids(self) -> Tensor:
        """(k,) centroids in the weight's units; differentiable."""
        return self.codebook.representatives()

    def forward(self, weights: Tensor) -> Tensor:
        return dkm_soft_weights(weights, self.centroids(), self.temperature)

    @torch.no_grad()
    def snap(self, weights: Tensor, bits: int) -> tuple[Tensor, Tensor]:
        """(each weight on its nearest centroid, the centroids sorted, duplicates dropped)."""
        centroids = self.centroids().unique()  # sorted
        assert centroids.numel() <= 2 ** bits, f"{centroids.numel()} centroids at {bits} bits"
        return centroids.to(weights.dtype)[assign(weights, centroids)], centroids

    def extra_repr(self) -> str:
        return f"temperature={self.temperature.item():.3g}"


@dataclass(frozen=True)
class DKMConfig(QuantizerOptions):
    """DKM: centroid initialisation, softmax temperature and centroid learning rate."""

    lr_scale: float = 1.0  # centroid learning rate = lr * this (centroids in RMS units)
    tau: float = 0.1  # temperature, in units of the mean squared gap between centroids
    init: str = "kmeans-exact"  # centroid init: one of qareg.cluster1d.INITS

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("tau", self.tau, 0, low_open=True)
        object.__setattr__(self, "init", check_init("init", self.init))


@register_method("dkm", config_class=DKMConfig, quantizer_class=DKMQuantizer, search_space=(
    {}, {"tau": 0.03}, {"tau": 0.3}, {"tau": 1.0}))
class DKMMethod(ParametrizedMethod):
    """Train through soft assignments to k = 2**bits learned centroids; snap at the end."""
