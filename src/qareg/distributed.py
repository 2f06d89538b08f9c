"""Multi-process training with DistributedDataParallel, as launched by `torchrun`.

Every rank holds the whole dataset and draws the same permutation from the same seed; each
takes its contiguous share of every global batch (`shard`). DDP averages the gradients of
the per-rank losses, which for equal shares is the gradient of the global batch's mean
loss, so a run on W processes follows a single-process run on the same global batch.
The codebooks are parameters of the model: DDP broadcasts them at the start and averages
their gradients like any other, so they stay identical on every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from qareg.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 without DDP)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and draws progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current_world() -> World:
    """The initialised process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env(device: str) -> tuple[World, str]:
    """Join the process group that `torchrun` describes in the environment (WORLD_SIZE,
    RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); returns the world and this rank's device.

    Without those variables, or with WORLD_SIZE=1, nothing happens. CUDA uses NCCL and one
    GPU per local rank (`cuda` becomes `cuda:LOCAL_RANK`); the CPU uses gloo.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return current_world(), device
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return current_world(), device


def shard(batch: Tensor, world: World) -> Tensor:
    """This rank's contiguous share of a global batch; the batch size must divide evenly."""
    if not world.distributed:
        return batch
    n = batch.shape[0]
    assert n % world.size == 0, f"batch of {n} does not split over {world.size} processes"
    share = n // world.size
    return batch[world.rank * share:(world.rank + 1) * share]


def mean_over_ranks(value: Tensor, world: World) -> Tensor:
    """The mean of a scalar tensor over all ranks (itself without DDP)."""
    if not world.distributed:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world.size


def leave_process_group(world: World) -> None:
    """Tear down the process group that `init_from_env` joined (nothing without DDP)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
