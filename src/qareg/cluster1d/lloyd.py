"""Lloyd's k-means in one dimension, and the k-means cost of a codebook.

Lloyd runs on sorted values with prefix sums, so an iteration costs O(k log N) after one
O(N log N) sort, never an N x k matrix. Clusters are cut at the boundaries of
`qareg.nearest` (a value on a midpoint belongs to the lower representative), the same rule
as every other lookup in qareg.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from qareg.cluster1d.seeding import init_quantile
from qareg.nearest import assign, midpoints


def lloyd(values: Tensor, representatives: Tensor, max_iters: int = 100) -> Tensor:
    """Lloyd's k-means from the given representatives, until assignments stop changing;
    returns (k,) sorted float64 representatives.

    On sorted values each cluster is a contiguous run, found by searching the boundaries;
    its mean comes from prefix sums. An empty cluster keeps its representative.
    """
    v = values.detach().flatten().double().cpu().sort().values  # (n,)
    prefix = torch.cat([v.new_zeros(1), v.cumsum(0)])  # (n + 1,)
    c = representatives.detach().double().cpu().sort().values  # (k,)
    previous_bounds = None
    for _ in range(max_iters):
        # cluster j covers sorted positions [bounds[j], bounds[j + 1]): values <= boundary
        # j belong to cluster j or below (the rule's tie goes to the lower one)
        bounds = torch.cat([
            torch.zeros(1, dtype=torch.long),
            torch.searchsorted(v, midpoints(c, torch.float64), right=True),
            torch.full((1,), v.numel(), dtype=torch.long),
        ])
        if previous_bounds is not None and torch.equal(bounds, previous_bounds):
            break
        previous_bounds = bounds
        counts = bounds[1:] - bounds[:-1]  # (k,)
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c).sort().values
    return c


def init_lloyd(values: Tensor, k: int) -> Tensor:
    """Lloyd's k-means started from the quantile initialisation (deterministic, local)."""
    return lloyd(values, init_quantile(values, k))


def sum_of_squares(values: Tensor | np.ndarray, representatives: Tensor | np.ndarray) -> float:
    """Sum over `values` of the squared distance to the nearest representative (float64)."""
    v = torch.as_tensor(values).detach().flatten().double().cpu()
    c = torch.as_tensor(representatives).detach().flatten().double().cpu().unique()  # sorted
    return (v - c[assign(v, c)]).square().sum().item()
