"""Quantization-aware penalties: pure functions of one weight tensor and its codebook.

Each returns a scalar that pulls every weight toward its representative and every
representative toward its weights; gradients flow to both.

Scaling. A term is a relative quantization error: a mean over the tensor's entries divided
by the tensor's current mean square (its square root for absolute distances), gradient
included. Perturbing a layer's weights by relative noise e changes the loss by about
beta * e^2 whatever the layer's size or weight scale, so a sum of these terms over layers
approximates what snapping would cost and one global lambda suits every layer.

The term is exactly invariant to scaling a tensor and its representatives together, so the
weights cannot lower it by shrinking: with a constant denominator they could, at no cost to
the task for a layer followed by batch norm. The gradient reaches the denominator: its
radial part cancels the numerator's, so the penalty neither shrinks nor inflates a layer.
The denominator never falls below (1e-3 * scale)^2, `scale` being the tensor's scale when
its codebook was made, so a layer whose weights all approach zero cannot blow up.

The hard and abs terms run as one autograd Function each (`qareg.penalty_kernels`): the
gradients are written out analytically and only the indices, one byte per weight for
k <= 256, are kept for backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qareg.constants import PENALTY_VARIANTS as VARIANTS
from qareg.nearest import assign
from qareg.penalty_kernels import NearestPenalty

POWERS = {"hard": 2, "abs": 1}  # the distance's power in the nearest-penalty variants


def penalty_floor(scale: Tensor) -> Tensor:
    """Smallest mean square used as a denominator: (1e-3 * scale)^2."""
    return (1e-3 * scale).square()


def _mean_square(w: Tensor, scale: Tensor) -> Tensor:
    return w.square().mean().clamp_min(penalty_floor(scale))


def hard_penalty(weights: Tensor, representatives: Tensor, scale: Tensor,
                 boundaries: Tensor | None = None) -> Tensor:
    """Mean squared distance to the nearest representative (or the one `boundaries`
    assign), over the mean square."""
    return NearestPenalty.apply(weights, representatives, penalty_floor(scale), POWERS["hard"],
                                boundaries)


def abs_penalty(weights: Tensor, representatives: Tensor, scale: Tensor,
                boundaries: Tensor | None = None) -> Tensor:
    """Mean absolute distance to the nearest representative, over the root mean square.

    The pull has constant strength, so weights settle exactly on a representative once it
    exceeds the task gradient, instead of hovering near it as with squared distances.
    """
    return NearestPenalty.apply(weights, representatives, penalty_floor(scale), POWERS["abs"],
                                boundaries)


def soft_penalty(
    weights: Tensor, representatives: Tensor, scale: Tensor, temperature: float
) -> Tensor:
    """Soft-min of relative squared distances at `temperature`.

    -T log sum_j exp(-d_j / T) with d_j = (w - c_j)^2 / mean(w^2): the negative
    log-likelihood of an equal-weight Gaussian mixture, up to a constant. Each weight is
    pulled toward a responsibility-weighted mix of representatives, each representative by
    the weights it is responsible for. The sum runs over the nearest representative and its
    two neighbours, O(N) memory; farther ones weigh exp(-gap^2 / T) or less. It tends to the
    hard penalty as T -> 0 and can dip below zero by at most T log 3.
    """
    w = weights.flatten()
    k = representatives.numel()
    nearest = assign(w, representatives)  # (N,)
    candidates = nearest.unsqueeze(1) + torch.arange(-1, 2, device=w.device)  # (N, 3)
    valid = (candidates >= 0) & (candidates < k)
    reps = representatives[candidates.clamp(0, k - 1)]  # (N, 3)
    distances = (w.unsqueeze(1) - reps).square() / _mean_square(w, scale)
    distances = distances.masked_fill(~valid, torch.inf)
    return (-temperature * torch.logsumexp(-distances / temperature, dim=1)).mean()


def tensor_penalty(
    variant: str, weights: Tensor, representatives: Tensor, scale: Tensor, temperature: float,
    boundaries: Tensor | None = None,
) -> Tensor:
    """Dispatch to one of `VARIANTS` (validated by the caller's config); `boundaries` (an
    entropy-constrained assignment) reach the hard and abs terms, the soft one is nearest."""
    if variant == "hard":
        return hard_penalty(weights, representatives, scale, boundaries)
    if variant == "abs":
        return abs_penalty(weights, representatives, scale, boundaries)
    assert variant == "soft", f"unknown penalty variant {variant!r}, expected one of {VARIANTS}"
    return soft_penalty(weights, representatives, scale, temperature)
