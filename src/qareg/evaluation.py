"""Accuracy of a network on a split, and the batches that re-estimate batch norm."""

from __future__ import annotations

import torch
from torch import nn

from qareg.config import TrainConfig
from qareg.data import BatchLoader, DatasetSplits, TensorData


def eval_loader(data: TensorData, splits: DatasetSplits, device: str | torch.device,
                batch_size: int = 1000) -> BatchLoader:
    """Batches of `data` in order, without augmentation."""
    return BatchLoader(data, batch_size, splits.mean, splits.std, shuffle=False, device=device)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, splits: DatasetSplits,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of `model` on `data`, in percent."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in eval_loader(data, splits, device):
        correct += (model(x).argmax(dim=1) == y).sum()
    model.train(was_training)
    return 100.0 * correct.item() / max(1, len(data))


def bn_loader(splits: DatasetSplits, config: TrainConfig) -> BatchLoader:
    """Training batches without augmentation (in an order fixed by `config.seed`), for
    re-estimating batch norm and calibrating after training."""
    return BatchLoader(splits.train, config.batch_size, splits.mean, splits.std, shuffle=True,
                       seed=config.seed + 1, device=config.device)
