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


def _sums_torch(w: Tensor, representatives: Tensor, power: int,
                boundaries: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward pass's per-weight and per-tensor quantities with torch ops, through
    slices: (saved, table, pull, sum of w^2, sum of |d|^p).

    `saved` holds one small integer per weight and `table[saved]` is its representative;
    `pull` (k,) is the sum of |d|^(p-1) sign(d) over each representative's weights; the
    sums are 0-d float64 tensors (no host sync on a GPU).
    """
    n, k = w.numel(), representatives.numel()
    table = representatives.detach().to(w.dtype)  # (k,)
    if boundaries is None:  # the nearest rule's; else given (entropy-constrained)
        boundaries = midpoints(table, w.dtype)
    boundaries = boundaries.to(device=w.device, dtype=w.dtype)  # (k - 1,)
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


def _sums_cpu(w: Tensor, representatives: Tensor, power: int,
              boundaries: Tensor | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`_sums_torch` in one parallel compiled pass (`qareg.penalty_cpu`)."""
    table = representatives.detach().to(w.dtype)  # (k,)
    saved = torch.empty(w.numel(), dtype=index_dtype(table.numel()))
    if boundaries is not None:
        boundaries = boundaries.to(dtype=w.dtype)
    pull, sum_square, sum_distance = penalty_cpu.forward_sums(w.contiguous(), table, power,
                                                              saved, boundaries)
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


def _penalty_forward(ctx, weights: Tensor, representatives: Tensor, floor: Tensor,  # noqa: ANN001
                     power: int, boundaries: Tensor | None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """P's value (module docstring), its saved state put on `ctx`; returns (value, saved
    indices, table). `boundaries` replace the nearest rule's midpoints where given."""
    assert power in (1, 2), f"power must be 1 or 2, got {power}"
    w = weights.detach().reshape(-1)  # (N,)
    n = w.numel()
    sums = _sums_cpu if penalty_cpu.supports(w) else _sums_torch
    saved, table, pull, sum_square, sum_distance = sums(w, representatives, power, boundaries)
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
    return value, saved, table


def _penalty_gradients(ctx, grad_output: Tensor, weights_wanted: bool,  # noqa: ANN001
                       representatives_wanted: bool, plus: Tensor | None = None
                       ) -> tuple[Tensor | None, Tensor | None]:
    """(dP/dw, dP/dc) times `grad_output`, each where wanted; `plus` added to dP/dw (in its
    compiled pass on the CPU)."""
    weights, saved, table, pull, value, unclamped, scale_d, scale_w = ctx.saved_tensors
    s_d = grad_output * scale_d  # 0-d tensors throughout: no host sync on a GPU
    grad_w = grad_c = None
    if weights_wanted:
        s_w = -grad_output * scale_w * value * unclamped
        if penalty_cpu.supports(weights) and (plus is None or plus.dtype == weights.dtype):
            grad_w = penalty_cpu.gradient(weights.detach(), saved, table, ctx.power,
                                          s_d.item(), s_w.item(), plus)
        else:
            grad_w = _gradient_torch(weights.detach(), saved, table, ctx.power, s_d, s_w)
            if plus is not None:
                grad_w.add_(plus)
    if representatives_wanted:
        grad_c = (-s_d * pull).to(ctx.rep_dtype)
    return grad_w, grad_c


class NearestPenalty(torch.autograd.Function):
    """P = mean(|w - c_a|^p) / max(mean(w^2), floor)^(p/2) for p = 1 or 2 (module
    docstring); saves 1 byte per weight for k <= 256 and tensors of a few times k entries."""

    @staticmethod
    def forward(ctx, weights: Tensor, representatives: Tensor, floor: Tensor,
                power: int, boundaries: Tensor | None = None) -> Tensor:
        return _penalty_forward(ctx, weights, representatives, floor, power, boundaries)[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_w, grad_c = _penalty_gradients(ctx, grad_output, *ctx.needs_input_grad[:2])
        return grad_w, grad_c, None, None, None


class SnappedNearestPenalty(torch.autograd.Function):
    """qareg's snapped training step in one pass per tensor (CPU, float weights): the
    snapped weights (`qareg.straight_through.SnappedStraightThrough`) and the penalty
    (`NearestPenalty`) from one nearest lookup, where the two alone look every weight up
    twice. Gradients are those of the two separately, summed as autograd sums them: the
    weights get the penalty's gradient plus the snapped one unchanged, the snapping
    representatives the snapped gradient summed per representative (in index order), the
    penalty's representatives its own. Two representative inputs, one per use, so that each
    reaches the codebook through its own path, as it does with the two functions."""

    @staticmethod
    def forward(ctx, weights: Tensor, snap_representatives: Tensor,  # noqa: ANN001
                penalty_representatives: Tensor, floor: Tensor, power: int,
                boundaries: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        value, saved, table = _penalty_forward(ctx, weights, penalty_representatives, floor,
                                               power, boundaries)
        ctx.snap_dtype, ctx.k = snap_representatives.dtype, table.numel()
        return penalty_cpu.gather(table, saved, weights.shape), value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_snapped: Tensor | None, grad_value: Tensor | None  # noqa: ANN001
                 ) -> tuple[Tensor | None, ...]:
        wants_w, wants_snap, wants_penalty = ctx.needs_input_grad[:3]
        grad_w = grad_snap = grad_c = None
        if grad_value is not None:  # the snapped gradient added to the penalty's, as autograd
            grad_w, grad_c = _penalty_gradients(ctx, grad_value, wants_w, wants_penalty,
                                                grad_snapped)
        elif wants_w:
            grad_w = grad_snapped
        if grad_snapped is not None:
            if wants_snap:
                saved = ctx.saved_tensors[1]
                grad_snap = penalty_cpu.sum_by_index(grad_snapped.reshape(-1).contiguous(),
                                                     saved, ctx.k).to(ctx.snap_dtype)
        return grad_w, grad_snap, grad_c, None, None, None


def fuses(weights: Tensor) -> bool:
    """Whether `SnappedNearestPenalty` takes `weights` (float32 or float64 on the CPU)."""
    return penalty_cpu.supports(weights)
