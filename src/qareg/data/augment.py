"""Batch augmentation on uint8 image tensors: random crops with zero padding, horizontal flips.

Every function works on a whole batch at once with tensor ops (no per-sample Python). The
random draws (`crop_offsets`, `flip_mask`) are separate from the pure transforms (`crop_at`,
`flip_where`) so a loader can draw a whole epoch's randomness up front.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qareg.errors import ConfigError


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation of a dataset; the default does nothing."""

    crop_padding: int = 0  # pixels of zero padding for random crops; 0 = no crop
    flip: bool = False  # random horizontal flips of about half the images

    def __post_init__(self) -> None:
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int):
            raise ConfigError(f"crop_padding={self.crop_padding!r} must be an int >= 0")
        if self.crop_padding < 0:
            raise ConfigError(f"crop_padding={self.crop_padding} must be >= 0")
        if not isinstance(self.flip, bool):
            raise ConfigError(f"flip={self.flip!r} must be True or False")


def crop_offsets(n: int, padding: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw per-sample crop offsets `(dy, dx)`, each (n,) int64 in [0, 2 * padding]."""
    offsets = torch.randint(
        0, 2 * padding + 1, (2, n), generator=generator, device=generator.device
    )  # (2, n)
    return offsets[0], offsets[1]


def crop_at(images: Tensor, padding: int, dy: Tensor, dx: Tensor) -> Tensor:
    """Crop each image of the zero-padded batch at its own offset: same shape as `images`."""
    if padding == 0:
        return images
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)  # (B, C, H + 2p, W + 2p)
    rows = dy.to(images.device)[:, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = dx.to(images.device)[:, None] + torch.arange(w, device=images.device)  # (B, W)
    # gather rows, then columns: each index tensor broadcasts one offset over C and the other axis
    padded = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))
    return padded.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Random crops of the zero-padded batch (N, C, H, W), a new offset for each image."""
    if padding < 0:
        raise ConfigError(f"padding={padding} must be >= 0")
    if padding == 0:
        return images
    dy, dx = crop_offsets(images.shape[0], padding, generator)
    return crop_at(images, padding, dy, dx)


def flip_mask(n: int, generator: torch.Generator) -> Tensor:
    """Draw which of n images to flip: (n,) bool, each True with probability 1/2."""
    return torch.rand(n, generator=generator, device=generator.device) < 0.5


def flip_where(images: Tensor, mask: Tensor) -> Tensor:
    """Flip horizontally the images of the batch (N, C, H, W) where `mask` (N,) is True."""
    return torch.where(mask.to(images.device)[:, None, None, None], images.flip(-1), images)


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Flip a random half (in expectation) of the batch (N, C, H, W) horizontally."""
    return flip_where(images, flip_mask(images.shape[0], generator))
