"""Fast exact kernels behind the hard and abs penalties.

The plain autograd formula (assign, gather, subtract, square, mean, divide by the mean
square) keeps an int64 index and several float copies of every weight alive until backward
and runs a dozen passes over them. Here one `torch.autograd.Function` computes the value,
and the per-cluster sums that the representatives' gradient needs, in its forward pass and
saves one small integer per weight (1 byte for k <= 256); backward rebuilds the distances
from them with one gather. Float tensors on the CPU take compiled passes that read each
weight once (`qareg.penalty_cpu`); elsewhere, or for other dtypes, torch ops run through
slices (`_sums_torch`, `_gradient_torch`) that bound the temporaries' memory. Both find the
nearest representative by `qareg.nearest`'s rule.

For P = sum_i |w_i - c_a(i)|^p / (N D), D = m^(p/2), m = max(mean(w^2), floor), u = 1 where
mean(w^2) >= floor (0 where clamped: the floor then blocks the gradient), p = 2 (hard) or
p = 1 (abs), and d_i = w_i - c_a(i):

    dP/dw_i = p / (N D) * |d_i|^(p-1) sign(d_i)  -  u * p * P * w_i / (N m)
    dP/dc_j = -p / (N D) * sum over {i : a(i) = j} of |d_i|^(p-1) sign(d_i)
"""

from __future__ import annotations

import torch
from torch import Tensor

from qareg import penalty_cpu
from qareg.nearest import index_dtype, midpoints

CHUNK = 1 << 22  # entries per slice of the torch path: bounds the temporaries' memory


def _sums_torch(w: Tensor, representatives: Tensor, power: int
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward pass's per-weight and per-tensor quantities with torch ops, through
    slices: (saved, table, pull, sum of w^2, sum of |d|^p).

    `saved` holds one small integer per weight and `table[saved]` is its representative;
    `pull` (k,) is the sum of |d|^(p-1) sign(d) over each representative's weights; the
    sums are 0-d float64 tensors (no host sync on a GPU).
    """
    n, k = w.numel(), representatives.numel()
    table = representatives.detach().to(w.dtype)  # (k,)
    boundaries = midpoints(table, w.dtype).to(w.device)  # (k - 1,)
    saved = torch.empty(n, dtype=index_dtype(k), device=w.device)
    pull = torch.zeros(k, dtype=w.dtype, device=w.device)
    sum_square = torch.zeros((), dtype=torch.float64, device=w.device)
    sum_distance = torch.zeros((), dtype=torch.float64, device=w.device)
    for part, saved_part in zip(w.split(CHUNK), saved.split(CHUNK), strict=True):
        index = torch.bucketize(part, boundaries)  # (chunk,) the rule of qareg.nearest
        saved_part.copy_(index)
        d = part - table[index]  # (chunk,)
        pull.index_add_(0, index, d if power == 2 else torch.sign(d))
        sum_square += part.double().square().sum()
        sum_distance += (d.double().square() if power == 2 else d.double().abs()).sum()
    return saved, table, pull, sum_square, sum_distance


def _sums_cpu(w: Tensor, representatives: Tensor, power: int
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`_sums_torch` in one parallel compiled pass (`qareg.penalty_cpu`)."""
    table = representatives.detach().to(w.dtype)  # (k,)
    saved = torch.empty(w.numel(), dtype=index_dtype(table.numel()))
    pull, sum_square, sum_distance = penalty_cpu.forward_sums(w.contiguous(), table, power,
                                                              saved)
    sums = torch.tensor([sum_square, sum_distance], dtype=torch.float64)
    return saved, table, pull, sums[0], sums[1]


def _gradient_torch(weights: Tensor, saved: Tensor, table: Tensor, power: int, s_d: Tensor,
                    s_w: Tensor) -> Tensor:
    """dP/dw = s_d * |d|^(p-1) sign(d) + s_w * w with torch ops, through slices."""
    w = weights.reshape(-1)
    # Not a view: autograd then adds the task's gradient into it in place.
    grad = torch.empty(weights.shape, dtype=w.dtype, device=w.device)
    flat = grad.view(-1)  # (N,)
    for part, saved_part, out in zip(w.split(CHUNK), saved.split(CHUNK), flat.split(CHUNK),
                                     strict=True):  # (chunk,) each
        torch.index_select(table, 0, saved_part.long(), out=out)  # c_a
        torch.sub(part, out, out=out)  # d
        if power == 1:
            out.sign_()
        out.mul_(s_d).addcmul_(part, s_w)
    return grad


class NearestPenalty(torch.autograd.Function):
    """P = mean(|w - c_a|^p) / max(mean(w^2), floor)^(p/2) for p = 1 or 2 (module
    docstring); saves 1 byte per weight for k <= 256 and tensors of a few times k entries."""

    @staticmethod
    def forward(ctx, weights: Tensor, representatives: Tensor, floor: Tensor,
                power: int) -> Tensor:
        assert power in (1, 2), f"power must be 1 or 2, got {power}"
        w = weights.detach().reshape(-1)  # (N,)
        n = w.numel()
        sums = _sums_cpu if penalty_cpu.supports(w) else _sums_torch
        saved, table, pull, sum_square, sum_distance = sums(w, representatives, power)
        mean_square = (sum_square / n).to(w.dtype)
        unclamped = (mean_square >= floor).to(w.dtype)  # clamp_min passes gradient at ==
        m = torch.maximum(mean_square, floor.to(w.dtype))
        denominator = m if power == 2 else m.sqrt()
        value = (sum_distance / n).to(w.dtype) / denominator
        scale_d, scale_w = power / (n * denominator), power / (n * m)
        # Besides one small integer per weight only tensors of a few times k entries;
        # `weights` is the caller's own tensor, saved by reference.
        ctx.save_for_backward(weights, saved, table, pull.to(w.dtype), value, unclamped,
                              scale_d, scale_w)
        ctx.power, ctx.rep_dtype = power, representatives.dtype
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        weights, saved, table, pull, value, unclamped, scale_d, scale_w = ctx.saved_tensors
        s_d = grad_output * scale_d  # 0-d tensors throughout: no host sync on a GPU
        grad_w = grad_c = None
        if ctx.needs_input_grad[0]:
            s_w = -grad_output * scale_w * value * unclamped
            if penalty_cpu.supports(weights):
                grad_w = penalty_cpu.gradient(weights.detach(), saved, table, ctx.power,
                                              s_d.item(), s_w.item())
            else:
                grad_w = _gradient_torch(weights.detach(), saved, table, ctx.power, s_d, s_w)
        if ctx.needs_input_grad[1]:
            grad_c = (-s_d * pull).to(ctx.rep_dtype)
        return grad_w, grad_c, None, None
