"""DKM: differentiable k-means clustering of weights (Cho et al., ICLR 2022).

The method behind the palettization of Apple's coremltools. In every forward pass each
weight is replaced by a soft mix of k centroids, weighted by an attention over its distances
to them; the task loss then trains weights and centroids together, with no penalty term.
The attention is an N x k matrix per tensor, kept for backward: k times the memory of the
weights, the cost that `benchmarks/regularizer_cost.py` sets beside qareg's penalty.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dkm_attention(weights: Tensor, centroids: Tensor, temperature: float) -> Tensor:
    """(N, k) attention of every weight over the centroids: softmax_j(-(w - c_j)^2 / T).

    `temperature` is in squared weight units; as it falls, each row tends to a one-hot
    vector on the nearest centroid.
    """
    assert centroids.dim() == 1, f"centroids must be 1-D, got {tuple(centroids.shape)}"
    assert temperature > 0, f"temperature must be positive, got {temperature}"
    distances = (weights.reshape(-1, 1) - centroids).square()  # (N, k)
    return torch.softmax(distances / -temperature, dim=1)  # (N, k), rows sum to one


def dkm_soft_weights(weights: Tensor, centroids: Tensor, temperature: float) -> Tensor:
    """`weights` with each entry replaced by its attention-weighted mix of centroids.

    Differentiable in both `weights` and `centroids`.
    """
    attention = dkm_attention(weights, centroids, temperature)  # (N, k)
    return (attention @ centroids).view_as(weights)  # (N,) -> weights' shape
