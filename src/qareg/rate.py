"""A differentiable estimate of how many bits the range coder will spend per weight.

The file stores each tensor's indices range coded near their empirical entropy H(q), q the
share of weights on each representative. H is a step function of the weights, so it gives
no gradient. Here each weight is instead split between the two representatives that
bracket it, c_a (its nearest) and c_b (the other side), with the share of c_a

    p_a = sigmoid((d_b^2 - d_a^2) / T),   d = distance in units of the tensor's scale,

the soft usage q_j is the mean share on representative j, and the estimate is H(q) in bits.
As T -> 0 every share becomes 0 or 1 and H(q) is the empirical entropy of the hard
assignments, what the coder spends (tests check this). Its gradient moves weights from rare
representatives toward frequent ones and the representatives toward the weights they
would gain: training can trade distortion for bytes, entropy-constrained quantization
learned end to end. Two neighbours per weight keep it O(N), not O(N k).

A large tensor's rate is estimated each step from a strided subset of about `sample`
weights (every s-th weight, s = ceil(N / sample), from an offset that turns with the step,
so that every weight is read once in s steps): the usage of 2^16 weights is known to about
0.002, and the sampled weights' gradients, which the estimate divides by the subset's size,
come out s times larger, so that over s steps each weight gets the gradient it would have
had (cheaper by s on vgg16's 2.4-million-weight layers; lenet5's and cnn4's tensors are
smaller than one sample and are read whole).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qareg.nearest import assign


def soft_usage(weights: Tensor, representatives: Tensor, scale: Tensor | float,
               temperature: float) -> Tensor:
    """(k,) soft share of `weights` on each representative (sums to 1)."""
    w = weights.reshape(-1)
    k = representatives.numel()
    with torch.no_grad():
        nearest = assign(w, representatives)
        above = w > representatives[nearest]
        other = torch.where(above, nearest + 1, nearest - 1).clamp(0, k - 1)
    d_near = (w - representatives[nearest]) / scale
    d_other = (w - representatives[other]) / scale
    share = torch.sigmoid((d_other.square() - d_near.square()) / temperature)
    share = torch.where(other == nearest, torch.ones_like(share), share)  # no other side
    counts = torch.zeros(k, dtype=share.dtype, device=share.device)
    counts = counts.index_add(0, nearest, share).index_add(0, other, 1 - share)
    return counts / max(1, w.numel())


def entropy_bits(usage: Tensor) -> Tensor:
    """H(usage) in bits; representatives with no share contribute 0."""
    safe = usage.clamp(min=torch.finfo(usage.dtype).tiny)
    return -(usage * safe.log()).sum() / math.log(2)


def torch_rate_bits(weights: Tensor, representatives: Tensor, scale: Tensor | float = 1.0,
                    temperature: float = 0.05) -> Tensor:
    """`rate_bits` through torch operations: any device and dtype (the reference)."""
    return entropy_bits(soft_usage(weights, representatives, scale, temperature))


def rate_bits(weights: Tensor, representatives: Tensor, scale: Tensor | float = 1.0,
              temperature: float = 0.05) -> Tensor:
    """Estimated index bits per weight of one tensor (differentiable; see the module):
    compiled passes on the CPU (`qareg.rate_cpu`), torch operations elsewhere."""
    from qareg import rate_cpu  # numba, only when used

    if rate_cpu.supports(weights):
        return rate_cpu.compiled_rate_bits(weights, representatives, float(scale), temperature)
    return torch_rate_bits(weights, representatives, scale, temperature)


def sampled(weights: Tensor, sample: int, step: int) -> Tensor:
    """The strided subset of `weights` (flattened) the rate reads at `step`: all of them
    when `sample` is 0 or they are no more than `sample`; else every s-th weight,
    s = ceil(N / sample), from offset step mod s (module docstring)."""
    flat = weights.reshape(-1)
    if not sample or flat.numel() <= sample:
        return flat
    stride = -(-flat.numel() // sample)
    return flat[step % stride::stride]


def model_rate_bits(tensors: list, temperature: float, sample: int = 0, step: int = 0
                    ) -> Tensor:
    """Estimated index bits per quantized weight of a model, averaged over all its quantized
    weights (`tensors`: `qareg.quantize.quantized_tensors(model)`); each tensor (or codebook
    group) estimated from about `sample` of its weights at `step` (`sampled`; 0: all)."""
    total, count = None, 0
    for t in tensors:
        term = sum(rate_bits(sampled(part, sample, step), row, t.codebook.scale, temperature)
                   * part.numel() for part, row, _ in t.codebook.parts(t.weight))
        total = term if total is None else total + term
        count += t.weight.numel()
    return total / max(1, count)
