"""Seedings of a codebook: evenly spaced, at quantiles, or k-means++ draws.

Each takes a tensor of values and returns `k` sorted representatives as a float64 tensor
of shape (k,); `qareg.cluster1d.initial_representatives` picks one by name.
"""

from __future__ import annotations

import torch
from torch import Tensor

# k-means++ seeding draws from at most this many values: D^2 sampling costs k passes.
KMEANSPP_MAX_VALUES = 1 << 20


def init_linear(values: Tensor, k: int) -> Tensor:
    """Evenly spaced over [min, max] (Deep Compression's choice: keeps the large weights)."""
    v = values.detach().flatten().double()
    return torch.linspace(v.min().item(), v.max().item(), k, dtype=torch.float64)


def init_quantile(values: Tensor, k: int) -> Tensor:
    """At the quantiles (j + 1/2) / k: representatives follow the density of the values."""
    v = values.detach().flatten().double().sort().values
    n = v.numel()
    positions = ((torch.arange(k, dtype=torch.float64) + 0.5) / k * n).long().clamp_(0, n - 1)
    return v[positions]


def init_kmeanspp(values: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeding (Arthur and Vassilvitskii 2007): each new representative is drawn
    with probability proportional to the squared distance to the nearest one chosen so far."""
    v = values.detach().flatten().double().cpu()
    if v.numel() > KMEANSPP_MAX_VALUES:
        keep = torch.randperm(v.numel(), generator=generator)[:KMEANSPP_MAX_VALUES]
        v = v[keep]
    first = torch.randint(v.numel(), (1,), generator=generator)
    chosen = [v[first].item()]
    nearest_sq = (v - chosen[0]).square()  # (n,)
    for _ in range(1, k):
        total = nearest_sq.sum()
        if total <= 0:  # fewer distinct values than k: the codebook spreads duplicates later
            chosen.append(chosen[-1])
            continue
        pick = torch.multinomial(nearest_sq / total, 1, generator=generator)
        chosen.append(v[pick].item())
        nearest_sq = torch.minimum(nearest_sq, (v - chosen[-1]).square())
    return torch.tensor(sorted(chosen), dtype=torch.float64)
