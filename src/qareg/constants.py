"""Limits and names shared across the package: a leaf module, importing only torch."""

from torch import nn

MAX_K = 1 << 16  # representatives per codebook: indices are stored with at most 16 bits
MAX_BITS = 8  # bit-widths the method harness takes: 1 .. MAX_BITS (k = 2**bits)
CODEBOOK_SUFFIX = "_codebook"  # a codebook of tensor `weight` is the submodule `weight_codebook`

# Initialisations of a codebook (`qareg.cluster1d`): evenly spaced, at quantiles, k-means++
# seeding, the globally optimal 1-D k-means, or Lloyd's local k-means from the quantiles.
INITS = ("linear", "quantile", "kmeans++", "kmeans-exact", "kmeans-lloyd")
RENAMED_INITS = {"kmeans": "kmeans-exact", "lloyd": "kmeans-lloyd"}  # old names, one release

PENALTY_VARIANTS = ("hard", "soft", "abs")  # `qareg.penalties`

DEFAULT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)  # every Conv*d and ConvTranspose*d
