"""The rate term (`qareg.rate`) as one autograd Function with compiled (numba) passes on
the CPU, instead of a dozen tensor-sized torch operations (which took qareg's vgg16 step
from 1.15x to 1.72x a plain step). One compiled pass finds each weight's logit and the
representative across it, torch's vectorized sigmoid turns the logits into shares, and one
more compiled pass adds up the soft counts; the shares and the representatives across are
kept for backward (5 bytes a float32 weight; `qareg.rate` samples large tensors), which
writes both gradients in one pass. (numba's exp is a scalar library call on machines
without Intel's SVML, which made exp-per-weight passes take a fifth of a vgg16 step.) Same
values and gradients as the torch formulation (tests compare them).

Per weight w with nearest representative c_a and other-side neighbour c_b, share
p = sigmoid(z), z = ((w - c_b)^2 - (w - c_a)^2) / (s^2 T); q = soft counts / N; H = entropy
of q in bits. Backward, with G_j = dH/dq_j = -(log2 q_j + 1 / ln 2):
dH/dw = (G_a - G_b) / N * p (1 - p) * 2 (c_a - c_b) / (s^2 T), and the same factor times
2 (w - c_a) / (s^2 T) for c_a, -2 (w - c_b) / (s^2 T) for c_b.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from qareg.nearest import assign, index_dtype
from qareg.nearest_cpu import supports, thread_plan


@njit(parallel=True, cache=True)
def _logits(w, c, nearest, inv, parts, z, other):  # noqa: ANN001
    """Per weight, the representative b across it from its nearest a (b == a where none
    is) into `other`, and the logit of a's share into `z` (+inf where b == a: share 1)."""
    n, k = w.size, c.size
    for part in prange(parts):
        for i in range(part * n // parts, (part + 1) * n // parts):
            a = np.int64(nearest[i])
            v = np.float64(w[i])
            c_a = c[a]
            b = min(max(a + 2 * np.int64(v > c_a) - 1, 0), k - 1)  # no branch to mispredict
            other[i] = b
            d_a, d_b = v - c_a, v - c[b]
            logit = (d_b * d_b - d_a * d_a) * inv
            z[i] = logit if b != a else np.inf  # rounded to z's dtype


@njit(parallel=True, cache=True)
def _soft_counts(p, nearest, other, partial):  # noqa: ANN001
    """Adds each weight's share p to its nearest representative and 1 - p to the other
    into `partial` (parts, k)."""
    n, parts = p.size, partial.shape[0]
    for part in prange(parts):
        for i in range(part * n // parts, (part + 1) * n // parts):
            share = np.float64(p[i])
            partial[part, nearest[i]] += share
            partial[part, other[i]] += 1.0 - share  # other == nearest: p = 1, adds 0


@njit(parallel=True, cache=True)
def _gradients(w, c, nearest, other, p, g, inv, scale_by, grad_w, partial):  # noqa: ANN001
    """grad_w (dH/dw times `scale_by`) for this slice, and dH/dc times `scale_by` added
    into `partial` (parts, k); `g` is dH/dq divided by N."""
    n, parts = w.size, partial.shape[0]
    for part in prange(parts):
        for i in range(part * n // parts, (part + 1) * n // parts):
            a, b, share = nearest[i], other[i], np.float64(p[i])
            v = np.float64(w[i])
            factor = scale_by * (g[a] - g[b]) * share * (1.0 - share) * 2.0 * inv
            grad_w[i] = factor * (c[a] - c[b])
            partial[part, a] += factor * (v - c[a])
            partial[part, b] -= factor * (v - c[b])


class CompiledRate(torch.autograd.Function):
    """H(soft usage) in bits of one tensor (see the module docstring)."""

    @staticmethod
    def forward(ctx, weights: Tensor, representatives: Tensor, scale: float,
                temperature: float) -> Tensor:
        w = weights.detach().reshape(-1).contiguous()
        c = representatives.detach().to(w.dtype)
        k = c.numel()
        nearest = assign(w, c).to(index_dtype(k)).numpy()  # 1 byte a weight for k <= 256
        inv = 1.0 / (scale * scale * temperature)
        shares = torch.empty_like(w)  # the logits, then (torch's sigmoid in place) the shares
        other = np.empty_like(nearest)
        _, parts = thread_plan(w.numel())
        _logits(w.numpy(), c.double().numpy(), nearest, inv, parts, shares.numpy(), other)
        torch.sigmoid(shares, out=shares)
        partial = np.zeros((parts, k))
        _soft_counts(shares.numpy(), nearest, other, partial)
        q = partial.sum(axis=0) / max(1, w.numel())
        used = q > 0
        bits = float(-(q[used] * np.log2(q[used])).sum())
        ctx.save_for_backward(weights, representatives)
        ctx.nearest, ctx.other, ctx.shares = nearest, other, shares.numpy()
        ctx.q, ctx.inv = q, inv
        return torch.tensor(bits, dtype=weights.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, upstream: Tensor) -> tuple[Tensor | None, ...]:
        weights, representatives = ctx.saved_tensors
        w = weights.detach().reshape(-1).contiguous().numpy()
        c = representatives.detach().to(weights.dtype).double().numpy()
        q = ctx.q
        g = np.where(q > 0, -(np.log2(np.maximum(q, 1e-300)) + 1.0 / math.log(2)), 0.0)
        g = g / max(1, w.size)
        grad_w = np.empty_like(w)
        _, parts = thread_plan(w.size)
        partial = np.zeros((parts, c.size))
        _gradients(w, c, ctx.nearest, ctx.other, ctx.shares, g, ctx.inv, float(upstream),
                   grad_w, partial)
        ctx.nearest = ctx.other = ctx.shares = None
        return (torch.from_numpy(grad_w).reshape(weights.shape),
                torch.from_numpy(partial.sum(axis=0)).to(representatives.dtype), None, None)


def compiled_rate_bits(weights: Tensor, representatives: Tensor, scale: float,
                       temperature: float) -> Tensor:
    """`qareg.rate.rate_bits` through the compiled passes (CPU float32/float64 only)."""
    return CompiledRate.apply(weights, representatives, float(scale), float(temperature))


__all__ = ["compiled_rate_bits", "supports"]
