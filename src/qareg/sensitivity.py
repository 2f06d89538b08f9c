"""Per-tensor sensitivities of the task loss to each quantized tensor's scaled distortion:
the weights a size budget gives each tensor's distortion (`qareg.budget`)."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import Tensor, nn

from qareg.errors import ConfigError
from qareg.quantize import QuantizedTensor, require_codebooks


def gradient_sensitivity(tensors: list[QuantizedTensor], loss: Tensor) -> dict[str, float]:
    """Per tensor of `tensors`: the mean squared gradient of `loss` over its weights times
    its codebook's scale squared (one batch's diagonal empirical Fisher along the scaled
    distortion). The graph is kept, so training's backward can follow."""
    grads = torch.autograd.grad(loss, [t.weight for t in tensors], retain_graph=True,
                                allow_unused=True)
    return {t.name: 0.0 if g is None else
            float(g.double().square().mean()) * float(t.codebook.scale) ** 2
            for t, g in zip(tensors, grads, strict=True)}


def fisher_sensitivity(model: nn.Module, batches: Iterable, max_batches: int = 4
                       ) -> dict[str, float]:
    """Per quantized tensor: `gradient_sensitivity` of the cross-entropy averaged over the
    first `max_batches` of `batches` ((inputs, labels) pairs): the loss's curvature along
    that tensor's scaled distortion. The model is left as it was."""
    tensors = require_codebooks(model)
    sums = {t.name: 0.0 for t in tensors}
    was_training, count = model.training, 0
    model.eval()
    try:
        for inputs, labels in islice(batches, max_batches):
            with torch.enable_grad():
                loss = nn.functional.cross_entropy(model(inputs), labels)
                for name, value in gradient_sensitivity(tensors, loss).items():
                    sums[name] += value
            count += 1
    finally:
        model.train(was_training)
    if not count:
        raise ConfigError("fisher_sensitivity: the batches are empty")
    return {name: value / count for name, value in sums.items()}
