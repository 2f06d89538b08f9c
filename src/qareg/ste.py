"""Straight-through estimators: functions whose forward value and gradient differ, the
building blocks of quantization-aware training (LSQ weights, learned activation steps)."""

from __future__ import annotations

import torch
from torch import Tensor


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """`x` in the forward pass, exactly; its gradient multiplied by `scale`."""
    scaled = x * scale
    return x.detach() + (scaled - scaled.detach())


def floor_ste(x: Tensor, low: Tensor | float) -> Tensor:
    """max(x, low) in the forward pass; the gradient passes to `x` unchanged."""
    return x.clamp(min=low).detach() + (x - x.detach())


def round_ste(x: Tensor) -> Tensor:
    """round(x) in the forward pass, exactly; the identity in the backward pass."""
    return x.round().detach() + (x - x.detach())


def sign_ste(x: Tensor) -> Tensor:
    """+1 where x >= 0, else -1, in the forward pass; the identity in the backward pass."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype).detach() + (x - x.detach())
