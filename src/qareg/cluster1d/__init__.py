"""One-dimensional clustering: the initial representatives of a codebook.

- `seeding`: evenly spaced ("linear"), at quantiles ("quantile"), k-means++ draws;
- `lloyd`: Lloyd's local k-means from the quantiles ("kmeans-lloyd");
- `exact`: the globally optimal k-means, `kmeans1d` ("kmeans-exact", the default).

Every function takes a flat tensor of values and returns `k` sorted representatives as a
float64 tensor of shape (k,).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from qareg.cluster1d.exact import KMeansTooLarge, kmeans1d
from qareg.cluster1d.lloyd import init_lloyd, lloyd, sum_of_squares
from qareg.cluster1d.seeding import init_kmeanspp, init_linear, init_quantile
from qareg.constants import INITS
from qareg.errors import QaregWarning
from qareg.validate import check_init

__all__ = ["INITS", "KMeansTooLarge", "init_kmeans_exact", "init_kmeanspp", "init_linear",
           "init_lloyd", "init_quantile", "initial_representatives", "kmeans1d", "lloyd",
           "sum_of_squares"]


def init_kmeans_exact(values: Tensor, k: int) -> Tensor:
    """The globally optimal k-means representatives (`kmeans1d`); for a k too large for the
    exact method on these values (thousands, on millions of values), Lloyd's, with a
    warning."""
    try:
        return kmeans1d(values, k)
    except KMeansTooLarge as error:
        warnings.warn(f"{error}; falling back to Lloyd's k-means", QaregWarning, stacklevel=2)
        return init_lloyd(values, k)


def initial_representatives(
    values: Tensor, k: int, method: str, generator: torch.Generator | None = None
) -> Tensor:
    """Sorted initial representatives (float64, shape (k,)) by one of `INITS`."""
    method = check_init("init", method)
    if method == "linear":
        return init_linear(values, k)
    if method == "quantile":
        return init_quantile(values, k)
    if method == "kmeans++":
        return init_kmeanspp(values, k, generator)
    if method == "kmeans-exact":
        return init_kmeans_exact(values, k)
    assert method == "kmeans-lloyd", f"unhandled init {method!r} of {INITS}"
    return init_lloyd(values, k)
