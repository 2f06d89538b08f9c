"""Re-estimating batch-norm statistics after the weights changed (snapping shifts them)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Batch-norm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable[Tensor | tuple | list], max_batches: int | None = None
) -> int:
    """Replace every batch-norm layer's running mean and variance by their average over
    `batches` (inputs, or (inputs, labels) pairs already on the model's device).

    Only batch norm runs in training mode; dropout and the rest stay in eval mode. Returns
    the number of batches used (0 when the model has no batch norm).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts equally
    model.eval()
    for bn in layers:
        bn.train()
    used = 0
    try:
        for batch in batches:
            if max_batches is not None and used >= max_batches:
                break
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(inputs)
            used += 1
    finally:
        for bn, momentum in zip(layers, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    assert used > 0, "recalibrate_batchnorm got no batches"
    return used
