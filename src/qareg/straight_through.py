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

from torch import Tensor, nn

from qareg.codebook import Codebook
from qareg.penalty_kernels import nearest_indices
from qareg.quantize import _require_codebooks


def snapped_straight_through(latent: Tensor, codebook: Codebook) -> Tensor:
    """The nearest representative of every entry in the forward pass; in the backward pass
    the identity to `latent` and a gather's gradient to the representatives."""
    representatives = codebook.representatives().to(latent.dtype)  # (k,)
    snapped = representatives[nearest_indices(latent, representatives)]
    return snapped + (latent - latent.detach())  # + exact zeros, carrying the gradient


@contextmanager
def straight_through(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model`'s quantized tensors read as their snapped values, with
    straight-through gradients (module docstring). Call `qareg.prepare` first."""
    shadowed = []
    try:
        for t in _require_codebooks(model):
            t.codebook.project_()  # sorted and distinct, as the nearest lookup needs
            snapped = snapped_straight_through(t.weight, t.codebook)
            shadowed.append(t)
            object.__setattr__(t.module, t.attribute, snapped)  # shadows the Parameter
        yield model
    finally:
        for t in shadowed:
            del t.module.__dict__[t.attribute]
