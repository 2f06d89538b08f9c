"""LSQ: learned step size quantization of the weights (Esser et al., ICLR 2020).

Each quantized tensor gets one learnable step size s and is trained through the uniform
quantizer w_q = round(clamp(w / s, -Qn, Qp)) * s, the rounding passed straight through.
The paper's gradient of s is d w_q / d s = round(w / s) - w / s inside the range and -Qn or
Qp outside, scaled by g = 1 / sqrt(N * Qp) so that steps of s and of the weights stay in
proportion. The step sizes live in `torch.nn.utils.parametrize` parametrizations of the
weights, so state_dict, deepcopy and DistributedDataParallel see them.

Choices the paper leaves open:
- 1 bit: the signed range {-1, 0} would waste a level on zero, so the binary variant is
  w_q = s * sign(w) (sign(0) = +1) with the same clipped straight-through estimator: the
  weight gradient passes where |w| <= s, the step's gradient is sign(w) - w / s inside and
  sign(w) outside, scaled by g with Qp = 1. Its step starts at the paper's formula with
  Qp = 1, 2 * mean|w|, rather than at mean|w| (the scale minimising ||w - s * sign(w)||^2,
  as in XNOR-Net), whose clipping range freezes about 40% of Gaussian weights.
- The step is learned as is (not in the log domain), as in the paper, but the forward pass
  uses |s|, floored at MIN_STEP_FRACTION of the initial step, the gradient passed through:
  one large SGD step can push s through zero, and a zero step would divide by zero.
- Step-size learning rate: lr * 0.1 by default (the paper: the weights' lr); on Fashion-MNIST
  validation the choice barely matters (the evidence: BENCHMARKS.md, "Defaults of the rival
  methods"); a tuned bench also tries the paper's 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qareg.methods.base import register_method
from qareg.methods.parametrized import ParametrizedMethod, QuantizerOptions
from qareg.ste import floor_ste, round_ste, scale_grad, sign_ste
from qareg.validate import check_bits

MIN_STEP_FRACTION = 1e-3  # the step acts as at least this share of its initial value


def lsq_range(bits: int) -> tuple[int, int]:
    """(Qn, Qp): the integer levels are -Qn .. Qp; (1, 1) at 1 bit, meaning {-1, +1}."""
    if bits == 1:
        return 1, 1
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def lsq_levels(bits: int) -> Tensor:
    """(2**bits,) the sorted integer levels the step size multiplies, as float32."""
    qn, qp = lsq_range(bits)
    if bits == 1:
        return torch.tensor([-1.0, 1.0])
    return torch.arange(-qn, qp + 1, dtype=torch.float32)


def lsq_initial_step(weights: Tensor, bits: int) -> float:
    """The paper's 2 * mean|w| / sqrt(Qp) (Qp = 1 at 1 bit); 1.0 for an all-zero tensor."""
    mean_abs = weights.detach().double().abs().mean().item()
    if mean_abs == 0:
        return 1.0
    return 2 * mean_abs / math.sqrt(lsq_range(bits)[1])


def lsq_quantize(weights: Tensor, step: Tensor, bits: int) -> Tensor:
    """LSQ fake quantization: round(clamp(w / s, -Qn, Qp)) * s, or s * sign(w) at 1 bit.

    `step` is a scalar tensor (> 0). Gradients: the weights get the straight-through one
    (1 inside the range, 0 outside); the step gets the paper's, times 1 / sqrt(N * Qp).
    """
    qn, qp = lsq_range(bits)
    s = scale_grad(step, 1.0 / math.sqrt(weights.numel() * qp))
    x = (weights / s).clamp(-qn, qp)  # same shape as weights
    levels = sign_ste(x) if bits == 1 else round_ste(x)
    return levels * s


class LSQQuantizer(nn.Module):
    """Parametrization of one weight tensor: its LSQ-quantized value, with a learned step."""

    def __init__(self, weights: Tensor, bits: int, config: LSQConfig | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        start = lsq_initial_step(weights, bits)
        # Scalar step size in the weight's units; the learnable part.
        self.step = nn.Parameter(torch.tensor(start, dtype=weights.dtype, device=weights.device))
        # Floor of the step in the forward pass (fixed).
        self.register_buffer("min_step", self.step.detach() * MIN_STEP_FRACTION)

    def step_size(self) -> Tensor:
        """The step the forward pass uses: |learned step|, floored at `min_step`."""
        return floor_ste(self.step.abs(), self.min_step)

    def forward(self, weights: Tensor) -> Tensor:
        return lsq_quantize(weights, self.step_size(), self.bits)

    def grid(self) -> Tensor:
        """(2**bits,) the sorted values the forward pass can return."""
        with torch.no_grad():
            step = self.step_size()
            return lsq_levels(self.bits).to(step) * step

    @torch.no_grad()
    def snap(self, weights: Tensor, bits: int) -> tuple[Tensor, Tensor]:
        """(`weights` quantized as in the forward pass, the grid)."""
        return self(weights), self.grid()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, step={self.step.item():.4g}"


@dataclass(frozen=True)
class LSQConfig(QuantizerOptions):
    """LSQ: which tensors, and how fast their step sizes learn."""

    lr_scale: float = 0.1  # step-size learning rate = lr * this (the paper: 1; see above)


@register_method("lsq", config_class=LSQConfig, quantizer_class=LSQQuantizer, search_space=(
    {}, {"lr_scale": 1.0}, {"lr": 3e-4}, {"lr": 3e-3}))
class LSQMethod(ParametrizedMethod):
    """Quantization-aware training with a learned step size per tensor (weights only)."""
