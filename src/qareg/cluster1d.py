"""One-dimensional clustering: initial representatives for a codebook and Lloyd's k-means;
the default init is the exact optimum, `kmeans1d` (in `qareg.exact_kmeans`).

Every function takes a flat tensor of values and returns `k` sorted representatives as a
float64 tensor of shape (k,). Lloyd runs on sorted values with prefix sums, so an iteration
costs O(k log N) after one O(N log N) sort, never an N x k matrix.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from qareg.errors import ConfigError
from qareg.exact_kmeans import KMeansTooLarge, kmeans1d

INITS = ("linear", "quantile", "kmeans++", "kmeans", "lloyd")

# k-means++ seeding draws from at most this many values: D^2 sampling costs k passes.
_KMEANSPP_MAX_VALUES = 1 << 20


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
    if v.numel() > _KMEANSPP_MAX_VALUES:
        keep = torch.randperm(v.numel(), generator=generator)[:_KMEANSPP_MAX_VALUES]
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


def lloyd(values: Tensor, representatives: Tensor, max_iters: int = 100) -> Tensor:
    """Lloyd's k-means from the given representatives, until assignments stop changing.

    On sorted values each cluster is a contiguous run, found by searching the midpoints;
    its mean comes from prefix sums. An empty cluster keeps its representative.
    """
    v = values.detach().flatten().double().sort().values  # (n,)
    prefix = torch.cat([v.new_zeros(1), v.cumsum(0)])  # (n + 1,)
    c = representatives.double().sort().values.cpu()
    v, prefix = v.cpu(), prefix.cpu()
    previous_bounds = None
    for _ in range(max_iters):
        mids = (c[:-1] + c[1:]) / 2
        # cluster j covers sorted positions [bounds[j], bounds[j + 1]); ties go to the lower one
        bounds = torch.cat([
            torch.zeros(1, dtype=torch.long),
            torch.searchsorted(v, mids, right=True),
            torch.full((1,), v.numel(), dtype=torch.long),
        ])
        if previous_bounds is not None and torch.equal(bounds, previous_bounds):
            break
        previous_bounds = bounds
        counts = bounds[1:] - bounds[:-1]  # (k,)
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c).sort().values
    return c


def sum_of_squares(values: Tensor | np.ndarray, representatives: Tensor | np.ndarray) -> float:
    """Sum over `values` of the squared distance to the nearest representative (float64)."""
    v = torch.as_tensor(values).detach().flatten().double().cpu()
    c = torch.as_tensor(representatives).detach().flatten().double().cpu().sort().values
    nearest = torch.bucketize(v, (c[:-1] + c[1:]) / 2)  # (n,) ties go to the lower one
    return (v - c[nearest]).square().sum().item()


def init_kmeans(values: Tensor, k: int) -> Tensor:
    """The globally optimal k-means representatives (`kmeans1d`); for a k too large for the
    exact method on these values (thousands, on millions of values), Lloyd's, with a
    warning."""
    try:
        return kmeans1d(values, k)
    except KMeansTooLarge as error:
        warnings.warn(f"{error}; falling back to Lloyd's k-means", stacklevel=2)
        return init_lloyd(values, k)


def init_lloyd(values: Tensor, k: int) -> Tensor:
    """Lloyd's k-means started from the quantile initialisation (deterministic, local)."""
    return lloyd(values, init_quantile(values, k))


def initial_representatives(
    values: Tensor, k: int, method: str, generator: torch.Generator | None = None
) -> Tensor:
    """Sorted initial representatives (float64, shape (k,)) by one of `INITS`."""
    if method == "linear":
        return init_linear(values, k)
    if method == "quantile":
        return init_quantile(values, k)
    if method == "kmeans++":
        return init_kmeanspp(values, k, generator)
    if method == "kmeans":
        return init_kmeans(values, k)
    if method == "lloyd":
        return init_lloyd(values, k)
    raise ConfigError(f"unknown codebook init {method!r}; valid inits: {', '.join(INITS)}")
