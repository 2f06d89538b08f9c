"""Forward passes through the snapped network: the straight-through estimator over codebooks.

Inside `with straight_through(model):` every quantized tensor reads as its snapped value,
each weight replaced by its nearest representative, exactly what `qareg.convert` will
leave. Backward passes the gradient unchanged to the latent weight (the straight-through
estimator, so a weight can move toward, and past, a midpoint) and, summed over the weights
it holds, to each representative (which then learns from the task loss, not only from the
penalty).

How: on entry each module gets an instance attribute of the tensor's name holding the
snapped tensor; Python finds it before `nn.Module.__getattr__` looks in `_parameters`, so
`module.weight` in the forward pass is the snapped tensor while the Parameter stays
registered as it was: `parameters()`, `state_dict()`, the optimizer and DDP's gradient hooks
see no change (a `torch.nn.utils.parametrize` parametrization would re-set the Parameter and
DDP would lose track of its gradients). On exit the attributes go. Only the forward pass
belongs inside the block: the graph it built keeps working after exit, and `qareg.penalty`
must see the latent weights, outside.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from qareg.channel_groups import channel_view
from qareg.codebook import Codebook
from qareg.nearest import assign, index_dtype
from qareg.penalties import POWERS, penalty_floor
from qareg.penalty_kernels import SnappedNearestPenalty, fuses
from qareg.quantize import QuantizedTensor, require_codebooks

FUSED_VARIANTS = tuple(POWERS)  # the penalties one snapping pass can compute

SLICE = 1 << 20  # entries per slice when summing gradients per representative


class SnappedStraightThrough(torch.autograd.Function):
    """Forward: each entry's nearest representative. Backward: the gradient unchanged to the
    latent tensor, and its sum over each representative's entries to the representatives.
    Saves one small integer per entry (1 byte for k <= 256)."""

    @staticmethod
    def forward(ctx, latent: Tensor, representatives: Tensor,
                boundaries: Tensor | None = None) -> Tensor:
        table = representatives.detach().to(latent.dtype)  # (k,)
        indices = assign(latent, table, boundaries)  # latent's shape, int64
        ctx.save_for_backward(indices.to(index_dtype(table.numel())))
        ctx.rep_dtype, ctx.k = representatives.dtype, table.numel()
        return table[indices]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        (indices,) = ctx.saved_tensors
        grad_reps = None
        if ctx.needs_input_grad[1]:
            grad_reps = _sum_by_index(grad.reshape(-1), indices.reshape(-1), ctx.k)
            grad_reps = grad_reps.to(ctx.rep_dtype)
        return grad, grad_reps, None


def _sum_by_index(values: Tensor, indices: Tensor, k: int) -> Tensor:
    """(k,) sums of `values` per index, through slices (int64 indices only a slice at a time)."""
    sums = torch.zeros(k, dtype=values.dtype, device=values.device)
    for part, index in zip(values.split(SLICE), indices.split(SLICE), strict=True):
        sums.index_add_(0, index.long(), part)
    return sums


def snapped_straight_through(latent: Tensor, codebook: Codebook) -> Tensor:
    """`latent` with each entry replaced by its nearest representative of `codebook` in the
    forward pass; straight-through gradients (`SnappedStraightThrough`). A grouped codebook
    snaps each group, in channel-scale units, to its own row, then scales back: the value
    `Codebook.dequantize` gives, and the gradient still reaches the latent unchanged."""
    if codebook.plain:
        return SnappedStraightThrough.apply(latent, codebook.representatives(),
                                            codebook.boundaries(latent.dtype))
    snapped = torch.cat([SnappedStraightThrough.apply(part, row)
                         for part, row, _ in codebook.parts(latent)])
    if codebook.channel_scale is None:
        return snapped
    return snapped * channel_view(codebook.channel_scale.to(snapped.dtype), snapped.ndim)


def fused_penalty_applies(tensors: list[QuantizedTensor], variant: str) -> bool:
    """Whether `straight_through(..., penalty_terms=...)` can compute the penalty of
    `variant` in the snapping pass for all of `tensors` (hard or abs, plain codebooks,
    float weights on the CPU)."""
    return variant in FUSED_VARIANTS and all(t.codebook.plain and fuses(t.weight)
                                             for t in tensors)


@contextmanager
def straight_through(model: nn.Module, penalty_terms: dict[str, Tensor] | None = None,
                     variant: str = "hard") -> Iterator[nn.Module]:
    """Within the block, `model`'s quantized tensors read as their snapped values, with
    straight-through gradients (module docstring). Call `qareg.prepare` first.

    With a `penalty_terms` dict, where `fused_penalty_applies`, each tensor's penalty term
    of `variant` (`qareg.penalty_terms`) is put there by name, found in the same pass that
    snaps it (`qareg.penalty_kernels.SnappedNearestPenalty`): the same values and gradients
    as computing the penalty after the block, at one nearest lookup instead of two."""
    tensors = require_codebooks(model)
    fused = penalty_terms is not None and fused_penalty_applies(tensors, variant)
    shadowed = []
    try:
        for t in tensors:
            t.codebook.project_()  # sorted and distinct, as the nearest lookup needs
            if fused:
                snapped, penalty_terms[t.name] = SnappedNearestPenalty.apply(
                    t.weight, t.codebook.representatives(), t.codebook.representatives(),
                    penalty_floor(t.codebook.scale), POWERS[variant],
                    t.codebook.boundaries(t.weight.dtype))
            else:
                snapped = snapped_straight_through(t.weight, t.codebook)
            shadowed.append(t)
            object.__setattr__(t.module, t.attribute, snapped)  # shadows the Parameter
        yield model
    finally:
        for t in shadowed:
            del t.module.__dict__[t.attribute]
