"""Batches from uint8 tensors already on the device: slices of one permutation per epoch.

Follows airbench: no DataLoader, no per-sample Python. All the randomness of an epoch (the
permutation, crop offsets, flips) is drawn from `generator` when the epoch starts, so the
generator's state between epochs fully defines the next epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from qareg.data.augment import Augment, crop_at, crop_offsets, flip_mask, flip_where
from qareg.data.splits import TensorData
from qareg.errors import ConfigError


class BatchLoader:
    """Iterate over `data` in batches of normalised float32 images and int64 labels."""

    def __init__(
        self,
        data: TensorData,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        shuffle: bool,
        augment: Augment | None = None,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be an int >= 1")
        channels = data.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(
                f"mean={tuple(mean)} and std={tuple(std)} need one value per channel ({channels})"
            )
        if any(s <= 0 for s in std):
            raise ConfigError(f"std={tuple(std)} must be > 0 for every channel")
        if augment is not None and not isinstance(augment, Augment):
            raise ConfigError(f"augment={augment!r} must be an Augment or None")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed={seed!r} must be an int")
        self.device = torch.device(device)
        self.images = data.images.to(self.device)  # (N, C, H, W) uint8, moved once
        self.labels = data.labels.to(self.device)  # (N,) int64
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment or Augment()
        self.drop_last = drop_last
        # (1, C, 1, 1) so they broadcast over a batch
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)  # CPU: small draws, then moved

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # draw the whole epoch now (not lazily) so the generator is ready for the next epoch
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator)  # (N,)
        else:
            order = torch.arange(n)
        pad = self.augment.crop_padding
        offsets = crop_offsets(n, pad, self.generator) if pad else None  # 2 x (N,)
        flips = flip_mask(n, self.generator) if self.augment.flip else None  # (N,) bool
        order = order.to(self.device)  # a no-op on the CPU
        offsets = tuple(t.to(self.device) for t in offsets) if offsets is not None else None
        flips = flips.to(self.device) if flips is not None else None
        return self._batches(order, offsets, flips)

    def _batches(
        self, order: Tensor, offsets: tuple[Tensor, Tensor] | None, flips: Tensor | None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl]  # (B,)
            images = self.images[idx]  # (B, C, H, W) uint8
            if offsets is not None:
                images = crop_at(images, self.augment.crop_padding, offsets[0][sl], offsets[1][sl])
            if flips is not None:
                images = flip_where(images, flips[sl])
            x = (images.float() / 255 - self.mean) / self.std  # (B, C, H, W) float32
            yield x, self.labels[idx]
