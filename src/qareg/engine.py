"""The one training loop, for every method: full precision, qareg and its rivals alike.

Reads top to bottom: build the loaders and the optimiser, then for every batch
`loss = task + lambda(t) * regularizer` (both from the method), step, and after every epoch
measure on the validation split (for methods that quantize while training, also after
converting a copy of the network), write the metrics file and call back (checkpointing
lives with the caller, `qareg.runs`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from qareg.act_quant import InputQuantizer, attach_input_quantizers, input_quantizers
from qareg.checkpoint import atomic_write
from qareg.codebook import Codebook
from qareg.config import TrainConfig
from qareg.data import BatchLoader, DatasetSplits, TensorData
from qareg.distributed import current_world, mean_over_ranks, shard
from qareg.errors import ConfigError, TrainingDiverged
from qareg.evaluation import bn_loader, evaluate
from qareg.methods.base import Method, Progress
from qareg.quantize import ConversionReport, convert


@dataclass(frozen=True)
class EpochMetrics:
    """One line of the metrics file."""

    epoch: int  # 1-based
    task_loss: float  # mean cross-entropy over the epoch's batches
    penalty: float  # mean unweighted regularization term (0 without a regularizer)
    lam: float  # lambda at the end of the epoch
    lr: float  # learning rate at the end of the epoch
    val_accuracy: float  # percent, the network as it trains (quantizers in place)
    val_accuracy_quantized: float | None  # percent, after converting a copy (None: fp, ptq)
    seconds: float  # wall time of the epoch, evaluation included


def convert_with_data(model: nn.Module, splits: DatasetSplits, config: TrainConfig,
                      method: Method | None = None, bits: int | None = None
                      ) -> ConversionReport:
    """Make the trained `model` a quantized one, in place, with batch norm re-estimated on
    `config.bn_batches` training batches: `method.convert(model, bits, ...)`, or without a
    method `qareg.convert` to the codebooks the model has (post-training k-means after
    `qareg.prepare`, or a network trained with codebooks)."""
    batches = bn_loader(splits, config)
    if method is None:
        return convert(model, batches, bn_max_batches=config.bn_batches)
    return method.convert(model, bits, batches, config.bn_batches)


def quantized_accuracy(model: nn.Module, data: TensorData, splits: DatasetSplits,
                       config: TrainConfig, method: Method) -> float:
    """Accuracy on `data` of a copy of `model` converted by `method`; the model itself is
    left as it is."""
    converted = copy.deepcopy(model)
    convert_with_data(converted, splits, config, method)
    return evaluate(converted, data, splits, config.device)


def make_optimizer(model: nn.Module, config: TrainConfig,
                   method: Method | None) -> torch.optim.Optimizer:
    """Network weights with weight decay; the method's own parameters (codebooks, step
    sizes, gates) in groups without it (decay would drag representatives toward zero) and at
    lr * their lr_scale. Codebooks no method claims (a prepared model trained in full
    precision) and the steps of input quantizers get a group without decay too."""
    own = method.param_groups(model) if method is not None else []
    claimed = {id(p) for group in own for p in group["params"]}
    loose = [p for m in model.modules() if isinstance(m, (Codebook, InputQuantizer))
             for p in m.parameters() if id(p) not in claimed]
    if loose:
        own = [*own, {"params": loose, "lr_scale": 1.0}]
    own_ids = {id(p) for group in own for p in group["params"]}
    weights = [p for p in model.parameters() if id(p) not in own_ids]
    groups = [{"params": weights, "weight_decay": config.weight_decay, "lr": config.lr}]
    for group in own:
        if group["params"]:
            groups.append({"params": list(group["params"]), "weight_decay": 0.0,
                           "lr": config.lr * group.get("lr_scale", 1.0)})
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


def _check_finite_loss(value: float, epoch: int) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(f"the training loss became {value} in epoch {epoch}; try a "
                               "lower learning rate or lambda")


def _check_finite(model: nn.Module, value: float, epoch: int) -> None:
    _check_finite_loss(value, epoch)
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise TrainingDiverged(f"parameter {name!r} became NaN or infinite in epoch {epoch}")


def _rng_states(device: torch.device) -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _write_metrics(path: Path, history: list[EpochMetrics]) -> None:
    """The metrics file: one JSON line per epoch so far, replaced atomically."""
    lines = "".join(json.dumps(asdict(m)) + "\n" for m in history).encode()
    atomic_write(path, lambda f: f.write(lines))


def train(
    model: nn.Module,
    splits: DatasetSplits,
    config: TrainConfig,
    method: Method | None = None,
    *,
    augment: bool = True,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
    description: str = "train",
) -> list[EpochMetrics]:
    """Train `model` (already on `config.device`, and `prepare`d by `method`) for
    `config.epochs` epochs; returns the metrics of every epoch. The loss is
    `task + method.lam(t) * method.regularizer(...)`; without a method, plain training.

    A new run seeds torch's global generator with `config.seed` as it starts, so that its
    random draws do not depend on what the process ran before (a resumed bench, a second
    run in one process). After every epoch `save_state(state)` receives what resuming needs
    besides the model
    (optimizer, schedule, random states, epoch, metrics so far); `resume=state` continues
    from it, given the model saved with it: the run then ends with the same weights as one
    never interrupted. Under a `torch.distributed` process group (see `qareg.distributed`)
    each rank trains on its share of every batch through DistributedDataParallel; only rank
    0 writes metrics, calls `save_state` and draws progress bars. `on_step(step)` is called
    after every optimizer step. `config.deterministic` switches the whole process to
    deterministic kernels (`torch.use_deterministic_algorithms(True)`), and leaves it so.
    """
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if method is not None and not isinstance(method, Method):
        raise ConfigError(f"method must be a qareg.methods.Method (create_method(name)), got "
                          f"{type(method).__name__}")
    world = current_world()
    if config.batch_size % world.size:
        raise ConfigError(f"batch_size {config.batch_size} must be a multiple of the number "
                          f"of processes ({world.size}): every rank takes an equal share")
    device = torch.device(config.device)
    if method is not None:
        method.check_act_bits(config.act_bits)
    if config.act_bits is not None and not input_quantizers(model):  # a fresh run: calibrate
        attach_input_quantizers(model, config.act_bits, bn_loader(splits, config),
                                make=method.input_quantizer if method is not None else None)
    bf16 = config.precision == "bf16"  # forward passes under bfloat16 autocast
    loader = BatchLoader(
        splits.train, config.batch_size, splits.mean, splits.std, shuffle=True, drop_last=True,
        augment=splits.default_augment if augment else None, seed=config.seed,
        device=config.device,
    )
    optimizer = make_optimizer(model, config, method)
    has_own_params = method is not None and any(g["params"] for g in method.param_groups(model))
    total_steps = config.epochs * len(loader)
    schedule = make_lr_schedule(optimizer, config, total_steps)
    # DDP averages gradients over ranks; the penalty reads the unwrapped model's tensors.
    forward = DistributedDataParallel(model) if world.distributed else model
    metrics_file = Path(metrics_path) if metrics_path is not None and world.is_main else None
    history: list[EpochMetrics] = []
    step, first_epoch = 0, 1
    if resume is None:  # random draws (dropout, DropBits gates) depend on the config alone
        torch.manual_seed(config.seed)
    else:
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["lr_schedule"])
        loader.generator.set_state(resume["loader_rng"])
        _set_rng_states(resume["rng"], device)
        history = [EpochMetrics(**m) for m in resume["history"]]
        step, first_epoch = resume["step"], resume["epoch"] + 1
        if method is not None:
            method.load_training_state(resume.get("method", {}))
        if metrics_file is not None and history:  # the epochs kept, none of a lost one
            _write_metrics(metrics_file, history)
    for epoch in range(first_epoch, config.epochs + 1):
        start = time.perf_counter()
        model.train()
        task_sum = torch.zeros((), device=device)
        penalty_sum = torch.zeros((), device=device)
        lam = 0.0
        bar = tqdm(loader, desc=f"{description} {epoch}/{config.epochs}",
                   disable=not progress or not world.is_main, leave=False, dynamic_ncols=True)
        for x, y in bar:
            where = Progress(step, total_steps, epoch, config.epochs)
            context = method.forward_context(model, where) if method else nullcontext()
            with context, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                task = F.cross_entropy(forward(shard(x, world)), shard(y, world))
            reg = None
            if method is not None:  # in float32 outside autocast, identical on every rank
                lam = method.lam(where)
                if lam or has_own_params:  # own params need a gradient every step (DDP)
                    reg = method.regularizer(model, task, where)
            if reg is None:
                reg = torch.zeros((), device=device)
            loss = task + lam * reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            task_sum += task.detach().float()
            penalty_sum += reg.detach()
            if step % 25 == 0:  # one host sync now and then: stop early when the loss breaks
                value = loss.item()
                _check_finite_loss(value, epoch)
                bar.set_postfix(loss=f"{task.item():.3f}", reg=f"{reg.item():.2e}")
            if on_step is not None:
                on_step(step)
        n = len(loader)
        task_loss = mean_over_ranks(task_sum, world).item() / n
        penalty_mean = penalty_sum.item() / n
        _check_finite(model, task_loss + lam * penalty_mean, epoch)
        metrics = EpochMetrics(
            epoch=epoch,
            task_loss=task_loss,
            penalty=penalty_mean,
            lam=lam,
            lr=optimizer.param_groups[0]["lr"],
            val_accuracy=evaluate(model, splits.val, splits, config.device),
            val_accuracy_quantized=(
                quantized_accuracy(model, splits.val, splits, config, method)
                if method is not None and not method.post_training and len(splits.val)
                else None
            ),
            seconds=time.perf_counter() - start,
        )
        history.append(metrics)
        if metrics_file is not None:  # written once an epoch ends: never an empty file
            _write_metrics(metrics_file, history)
        if world.is_main and save_state is not None:
            save_state({
                "epoch": epoch,
                "step": step,
                "optimizer": optimizer.state_dict(),
                "lr_schedule": schedule.state_dict(),
                "loader_rng": loader.generator.get_state(),
                "rng": _rng_states(device),
                "history": [asdict(m) for m in history],
                "method": method.training_state() if method is not None else {},
            })
        if on_epoch is not None and world.is_main:
            on_epoch(metrics)
    return history
