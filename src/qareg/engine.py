"""The one training and evaluation loop, for full precision and regularized training alike.

Reads top to bottom: build the loaders and the optimiser, then for every batch
`loss = task + lambda(t) * penalty`, step, and after every epoch measure on the validation
split (for regularized runs also after snapping a copy of the network), log a JSON line and
call back (checkpointing lives with the caller).
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qareg.config import RegularizerConfig, TrainConfig
from qareg.data import BatchLoader, DatasetSplits, TensorData
from qareg.errors import QaregError
from qareg.quantize import ConversionReport, convert, penalty, quantized_tensors


class TrainingDiverged(QaregError):
    """The loss or the weights became NaN or infinite."""


@dataclass(frozen=True)
class EpochMetrics:
    """One line of the metrics file."""

    epoch: int  # 1-based
    task_loss: float  # mean cross-entropy over the epoch's batches
    penalty: float  # mean regularization term (0 without a regularizer)
    lam: float  # lambda at the end of the epoch
    lr: float  # learning rate at the end of the epoch
    val_accuracy: float  # percent, full-precision weights
    val_accuracy_quantized: float | None  # percent, after snapping a copy (regularized runs)
    seconds: float  # wall time of the epoch, evaluation included


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
    """Training batches without augmentation, for re-estimating batch norm after convert."""
    return BatchLoader(splits.train, config.batch_size, splits.mean, splits.std, shuffle=True,
                       seed=config.seed + 1, device=config.device)


def convert_with_data(model: nn.Module, splits: DatasetSplits,
                      config: TrainConfig) -> ConversionReport:
    """`qareg.convert` with batch norm re-estimated on `config.bn_batches` training batches."""
    return convert(model, bn_loader(splits, config), bn_max_batches=config.bn_batches)


def quantized_accuracy(model: nn.Module, data: TensorData, splits: DatasetSplits,
                       config: TrainConfig) -> float:
    """Accuracy on `data` of a snapped copy of `model`; the model itself is left as it is."""
    snapped = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_with_data(snapped, splits, config)
    return evaluate(snapped, data, splits, config.device)


def make_optimizer(model: nn.Module, config: TrainConfig,
                   regularizer: RegularizerConfig | None) -> torch.optim.Optimizer:
    """Weights with weight decay; codebooks in their own group, without it (decay would
    drag representatives toward zero) and at lr * codebook_lr_scale."""
    codebook_params = [t.codebook.normalized for t in quantized_tensors(model)]
    codebook_ids = {id(p) for p in codebook_params}
    weights = [p for p in model.parameters() if id(p) not in codebook_ids]
    groups = [{"params": weights, "weight_decay": config.weight_decay, "lr": config.lr}]
    if codebook_params:
        scale = regularizer.codebook_lr_scale if regularizer is not None else 1.0
        groups.append({"params": codebook_params, "weight_decay": 0.0, "lr": config.lr * scale})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    return torch.optim.Adam(groups, lr=config.lr, betas=(config.momentum, 0.999))


def make_lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig,
                     total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule over `total_steps`."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total_steps))
    if config.lr_schedule == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, peaks,
                                                   total_steps=max(2, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _check_finite(model: nn.Module, value: float, epoch: int) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(f"the training loss became {value} in epoch {epoch}; try a "
                               "lower learning rate or lambda")
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise TrainingDiverged(f"parameter {name!r} became NaN or infinite in epoch {epoch}")


def train(
    model: nn.Module,
    splits: DatasetSplits,
    config: TrainConfig,
    regularizer: RegularizerConfig | None = None,
    *,
    augment: bool = True,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    description: str = "train",
) -> list[EpochMetrics]:
    """Train `model` (already on `config.device`; prepared with codebooks when `regularizer`
    is given) for `config.epochs` epochs; returns the metrics of every epoch."""
    if regularizer is not None and not quantized_tensors(model):
        raise QaregError("train with a regularizer needs a model prepared with codebooks")
    loader = BatchLoader(
        splits.train, config.batch_size, splits.mean, splits.std, shuffle=True, drop_last=True,
        augment=splits.default_augment if augment else None, seed=config.seed,
        device=config.device,
    )
    optimizer = make_optimizer(model, config, regularizer)
    total_steps = config.epochs * len(loader)
    schedule = make_lr_schedule(optimizer, config, total_steps)
    metrics_file = Path(metrics_path) if metrics_path is not None else None
    history = []
    step = 0
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        model.train()
        task_sum = torch.zeros((), device=config.device)
        penalty_sum = torch.zeros((), device=config.device)
        lam = 0.0
        bar = tqdm(loader, desc=f"{description} {epoch}/{config.epochs}", disable=not progress,
                   leave=False, dynamic_ncols=True)
        for x, y in bar:
            task = F.cross_entropy(model(x), y)
            if regularizer is not None:
                progress_fraction = step / max(1, total_steps)
                lam = regularizer.lambda_at(progress_fraction)
                temperature = regularizer.temperature_at(progress_fraction)
                reg = penalty(model, regularizer.variant, temperature=temperature,
                              layer_weights=regularizer.layer_weights)
            else:
                reg = torch.zeros((), device=config.device)
            loss = task + lam * reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            task_sum += task.detach()
            penalty_sum += reg.detach()
            if step % 25 == 0:
                bar.set_postfix(loss=f"{task.item():.3f}", reg=f"{reg.item():.2e}")
        n = len(loader)
        task_loss, penalty_mean = task_sum.item() / n, penalty_sum.item() / n
        _check_finite(model, task_loss + lam * penalty_mean, epoch)
        metrics = EpochMetrics(
            epoch=epoch,
            task_loss=task_loss,
            penalty=penalty_mean,
            lam=lam,
            lr=optimizer.param_groups[0]["lr"],
            val_accuracy=evaluate(model, splits.val, splits, config.device),
            val_accuracy_quantized=(
                quantized_accuracy(model, splits.val, splits, config)
                if regularizer is not None and len(splits.val) else None
            ),
            seconds=time.perf_counter() - start,
        )
        history.append(metrics)
        if metrics_file is not None:
            metrics_file.parent.mkdir(parents=True, exist_ok=True)
            with metrics_file.open("a") as f:
                f.write(json.dumps(asdict(metrics)) + "\n")
        if on_epoch is not None:
            on_epoch(metrics)
    return history
