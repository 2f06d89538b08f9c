"""CPQ with DropBits: cluster-promoting quantization (Lee, Yun, Hwang, Yang, ICCV 2021).

Each quantized tensor gets a learnable uniform grid g_i = alpha * i + beta, i from -2^(b-1)
to 2^(b-1) - 1, as in Relaxed Quantization (Louizos et al., ICLR 2019): a weight w with
logistic noise of scale sigma falls in the bin of g_i with probability

    pi_i = Sigmoid((g_i + alpha/2 - w) / sigma) - Sigmoid((g_i - alpha/2 - w) / sigma),

the outer bins reaching to -inf and +inf. CPQ's forward pass takes the mode of that
categorical (a one-hot times the grid); its backward pass is the multi-class
straight-through estimator: the gradient with respect to the one-hot, dL/dy * g_i, is
passed to the unnormalised probabilities pi_i, so w, alpha, beta and sigma all learn.

DropBits: a grid point's level is the smallest bit-width whose grid holds it (dropping the
lowest bit of a b-bit grid leaves the (b-1)-bit grid: twice the step, same beta). Level 1
(the two points beta - 2^(b-1) alpha and beta) is always kept; levels 2..b each have a
hard-concrete gate z_k (Louizos et al., ICLR 2018) and level k is kept with the mask
m_k = z_2 * ... * z_k, so dropping a level drops every finer one and what stays is a grid.
A dropped level masks the probabilities multiplicatively, unnormalised: pi_i -> m_k pi_i
for the points of level k, in the mode (a point with m = 0 is never chosen) and in the
estimator. In training each forward pass draws the gates; the mask takes the value
1[z > 0] (a level is dropped with probability P(z = 0), `drop_rate` at the start) while the
gradient flows through the relaxed z (straight-through). Eval mode opens a gate exactly
when its deterministic hard-concrete value is above 0. With `lam_bits > 0` the gates learn
under an L0 penalty (the sum of P(z_k != 0)), so each tensor can end with its own
bit-width; with `lam_bits = 0` they stay at `drop_rate` and every tensor keeps b bits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from qareg.act_quant import MIN_STEP, InputQuantizer, register_input_quantizer
from qareg.errors import ConfigError
from qareg.methods.base import Progress, register_method
from qareg.methods.parametrized import (
    ParametrizedMethod,
    QuantizerOptions,
    find_parametrizations,
)
from qareg.validate import check_bool, check_float

# Hard-concrete gates (Louizos et al. 2018): temperature and stretch interval.
GATE_BETA = 2.0 / 3.0
GATE_GAMMA = -0.1
GATE_ZETA = 1.1
_GATE_SHIFT = GATE_BETA * math.log(-GATE_GAMMA / GATE_ZETA)  # P(z != 0) = sigmoid(la - shift)
MAX_DROP_RATE = 0.5  # above ~0.69 the deterministic gates would start closed
INIT_RATIOS = 64  # clipping ratios tried by fit_grid


@dataclass(frozen=True)
class CPQConfig(QuantizerOptions):
    """CPQ with DropBits: grid, noise, bit-drop gates and the bit-width penalty."""

    lr_scale: float = 1.0  # learning rate of alpha, beta, sigma, relative to the weights'
    sigma_init: float = 1.0 / 3.0  # logistic noise scale at the start, in grid steps (alpha)
    dropbits: bool = True  # drop bit levels at random during training (hard-concrete gates)
    drop_rate: float = 0.1  # probability that a gate is closed at the start, in (0, 0.5]
    lam_bits: float = 0.0  # weight of the L0 penalty on the gates; 0: gates frozen, b bits kept
    gate_lr_scale: float = 1.0  # learning rate of the gates' log-alphas, relative (lam_bits > 0)
    # with act_bits (--act-bits A): layer inputs through CPQ's own activation quantizer (a
    # learned grid and noise, mode forward, multi-class STE) instead of the shared LSQ one
    activations: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("sigma_init", self.sigma_init, 0.0, low_open=True)
        check_bool("dropbits", self.dropbits)
        check_float("drop_rate", self.drop_rate, 0.0, MAX_DROP_RATE, low_open=True)
        check_float("lam_bits", self.lam_bits, 0.0)
        check_float("gate_lr_scale", self.gate_lr_scale, 0.0, low_open=True)
        check_bool("activations", self.activations)
        if self.lam_bits > 0 and not self.dropbits:
            raise ConfigError(f"lam_bits={self.lam_bits} needs dropbits=True: bit-widths are "
                              "learned through the DropBits gates; set lam_bits=0 or "
                              "dropbits=True")


# ----- the grid and its bit levels -----

def grid_index(bits: int) -> Tensor:
    """(2^bits,) integer positions i of the grid points alpha * i + beta, ascending."""
    return torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.float64)


def grid_levels(bits: int) -> Tensor:
    """(2^bits,) level of each grid point: the smallest bit-width whose grid holds it.

    Level k < bits keeps the points whose index is a multiple of 2^(bits - k); level 1 is
    the two points i = -2^(bits-1) and i = 0.
    """
    index = grid_index(bits).long()
    levels = torch.full_like(index, bits)
    for k in range(bits - 1, 0, -1):
        levels[index % 2 ** (bits - k) == 0] = k
    return levels


def level_masks(gates: Tensor) -> Tensor:
    """(b,) mask of levels 1..b from the (b-1,) gates of levels 2..b: m_k = z_2 * ... * z_k."""
    return torch.cat([gates.new_ones(1), torch.cumprod(gates, 0)])


def fit_grid(weights: Tensor, bits: int, ratios: int = INIT_RATIOS) -> tuple[Tensor, Tensor]:
    """(alpha, beta) of the b-bit grid centred on the weights' mean whose rounding error is
    smallest over `ratios` clipping ranges (a fraction of the largest deviation)."""
    flat = weights.detach().reshape(-1).double()
    center = flat.mean()
    spread = (flat - center).abs().max().clamp_min(1e-8)
    k = 2 ** bits
    best = (math.inf, spread, center)
    for r in torch.linspace(1.0 / ratios, 1.0, ratios, dtype=torch.float64):
        step = 2 * r * spread / (k - 1)  # k points span center -+ r * spread
        offset = center + step / 2  # grid centre (i = -1/2) on the mean
        index = torch.round((flat - offset) / step).clamp(-k // 2, k // 2 - 1)
        error = (index * step + offset - flat).square().mean().item()
        if error < best[0]:
            best = (error, step, offset)
    return best[1].to(weights.dtype), best[2].to(weights.dtype)


# ----- relaxed-quantization probabilities and the multi-class straight-through estimator -----

def interval_log_probs(weights: Tensor, grid: Tensor, step: Tensor, sigma: Tensor) -> Tensor:
    """(N, K) log pi_i: log-probability that w + logistic noise of scale `sigma` falls in the
    bin [g_i - step/2, g_i + step/2] (outer bins unbounded); rows sum to one in probability.

    Computed in log space, stable however far w lies from a bin:
    S(u) - S(l) = S(u) S(-l) (1 - exp(l - u)), with u - l = step / sigma.
    """
    w = weights.reshape(-1, 1)  # (N, 1)
    upper = (grid + step / 2 - w) / sigma  # (N, K)
    lower = upper - step / sigma  # (N, K)
    inner = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(-step / sigma))
    return torch.cat([F.logsigmoid(upper[:, :1]), inner[:, 1:-1], F.logsigmoid(-lower[:, -1:])],
                     dim=1)


def _gather_sum(grid: Tensor, mode: Tensor, g: Tensor) -> Tensor:
    """sum_i g_i * grid[mode_i], differentiable in `grid`. On the CPU as sum_j grid_j * (the
    sum of g over the entries of mode j), whose bincount adds in a fixed order: the backward
    of `grid[mode]` accumulates over threads in a varying one, and two runs of cpq on two
    threads then differed. Elsewhere the indexing, which deterministic mode makes exact."""
    if grid.device.type != "cpu":
        return (g.view(-1) * grid[mode]).sum()
    per_point = torch.bincount(mode, weights=g.view(-1).double(), minlength=grid.numel())
    return (grid * per_point.to(grid.dtype)).sum()


class _ModeWithMultiClassSTE(torch.autograd.Function):
    """Forward: the mode of the masked categorical, on the grid. Backward: the one-hot's
    gradient goes to the masked probabilities m_i pi_i (recomputed here, so only one N x K
    matrix lives at a time instead of one per layer kept for the whole backward pass)."""

    @staticmethod
    def forward(ctx: Any, weights: Tensor, step: Tensor, offset: Tensor, sigma: Tensor,
                mask: Tensor, index: Tensor) -> Tensor:
        grid = step * index + offset  # (K,)
        scores = interval_log_probs(weights, grid, step, sigma) + mask.log()  # (N, K)
        mode = scores.argmax(dim=1)  # (N,), never a masked point: its score is -inf
        ctx.save_for_backward(weights, step, offset, sigma, mask, index, mode)
        return grid[mode].view_as(weights)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        index, mode = saved[5], saved[6]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(n) for t, n in zip(saved[:5], needs, strict=True)]
            weights, step, offset, sigma, mask = inputs
            grid = step * index + offset  # (K,)
            probs = interval_log_probs(weights, grid, step, sigma).exp() * mask  # (N, K)
            g = grad_out.reshape(-1, 1)  # (N, 1) dL/dy
            # dL/d onehot_i = dL/dy * g_i, routed to the unnormalised m_i pi_i; the second
            # term is the ordinary gradient of y = g[mode] w.r.t. alpha and beta.
            surrogate = (probs * (g * grid.detach())).sum() + _gather_sum(grid, mode, g)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(surrogate, wanted)) if wanted else iter(())
        return (*(next(grads) if n else None for n in needs), None)


def cpq_quantize(weights: Tensor, step: Tensor, offset: Tensor, sigma: Tensor, mask: Tensor,
                 index: Tensor) -> Tensor:
    """`weights` replaced by their most probable point of the grid step * index + offset
    under the point `mask` (K,), with CPQ's multi-class straight-through gradient: the
    one-hot's gradient goes to the unnormalised masked probabilities m_i pi_i."""
    return _ModeWithMultiClassSTE.apply(weights, step, offset, sigma, mask, index)


# ----- hard-concrete gates -----

def gate_log_alpha(drop_rate: float) -> float:
    """Gate log-alpha at which P(z = 0) = drop_rate."""
    return _GATE_SHIFT - math.log(drop_rate / (1 - drop_rate))


def gate_prob_open(log_alpha: Tensor) -> Tensor:
    """P(z != 0) of hard-concrete gates: the L0 penalty's terms."""
    return torch.sigmoid(log_alpha - _GATE_SHIFT)


def sample_gates(log_alpha: Tensor) -> Tensor:
    """One hard-concrete draw per gate, in [0, 1], exactly 0 or 1 with positive probability."""
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / GATE_BETA)
    return (s * (GATE_ZETA - GATE_GAMMA) + GATE_GAMMA).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: Tensor) -> Tensor:
    """Eval-mode gates: 1 where the hard-concrete test value
    clamp(sigmoid(la) (zeta - gamma) + gamma, 0, 1) is above 0, else 0."""
    value = torch.sigmoid(log_alpha) * (GATE_ZETA - GATE_GAMMA) + GATE_GAMMA
    return (value > 0).to(log_alpha.dtype)


# ----- the per-tensor quantizer, a parametrization of the weight -----

class CPQQuantizer(nn.Module):
    """Learnable b-bit grid, noise scale and DropBits gates of one tensor."""

    def __init__(self, weights: Tensor, bits: int, config: CPQConfig,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        step, offset = fit_grid(weights, bits)
        dtype, device = weights.dtype, weights.device
        self.bits = bits
        self.dropbits = config.dropbits
        self.log_step = nn.Parameter(step.log().reshape(()).to(device))  # alpha = exp
        self.offset = nn.Parameter(offset.reshape(()).to(device))  # beta
        self.log_sigma = nn.Parameter((step * config.sigma_init).log().reshape(()).to(device))
        gates = torch.full((bits - 1,), gate_log_alpha(config.drop_rate), dtype=dtype,
                           device=device)  # (b-1,) log-alphas of levels 2..b
        if config.dropbits and config.lam_bits > 0:
            self.gate_logits = nn.Parameter(gates)
        else:  # frozen: DropBits as a fixed-rate dropout of levels, or no gates at all
            self.register_buffer("gate_logits", gates)
        self.register_buffer("index", grid_index(bits).to(dtype=dtype, device=device))
        self.register_buffer("level", grid_levels(bits).to(device))

    def gates(self) -> Tensor:
        """(b-1,) gates of levels 2..b: sampled in training, deterministic in eval mode."""
        if not self.dropbits:
            return torch.ones_like(self.gate_logits)
        if not self.training:
            return deterministic_gates(self.gate_logits)
        z = sample_gates(self.gate_logits)
        return (z > 0).to(z.dtype) + (z - z.detach())  # value exactly 1[z > 0], grad of z

    def point_mask(self, gates: Tensor, max_bits: int | None = None) -> Tensor:
        """(K,) mask of the grid points given the gates; levels above `max_bits` dropped."""
        mask = level_masks(gates)[self.level - 1]
        if max_bits is not None:
            mask = mask * (self.level <= max_bits)
        return mask

    def grid(self) -> Tensor:
        """(K,) all grid points, ascending."""
        return self.log_step.exp() * self.index + self.offset

    def quantize(self, weights: Tensor, mask: Tensor) -> Tensor:
        return cpq_quantize(weights, self.log_step.exp(), self.offset, self.log_sigma.exp(),
                            mask, self.index)

    def forward(self, weights: Tensor) -> Tensor:
        return self.quantize(weights, self.point_mask(self.gates()))

    def active_bits(self) -> int:
        """Bit-width left by the deterministic gates."""
        was_training = self.training
        self.eval()
        bits = int(level_masks(self.gates()).sum().item())
        self.train(was_training)
        return bits

    @torch.no_grad()
    def snap(self, weights: Tensor, max_bits: int) -> tuple[Tensor, Tensor]:
        """(weights on their eval-mode mode grid point, the active grid points ascending),
        at most `max_bits` levels kept."""
        was_training = self.training
        self.eval()
        mask = self.point_mask(self.gates(), max_bits)
        values = self.quantize(weights, mask)
        self.train(was_training)
        return values, self.grid()[mask > 0]


class CPQInputQuantizer(InputQuantizer):
    """CPQ's activation path: a layer's input snapped to the mode of its relaxed-quantization
    categorical over a learned grid step * i + offset (i over the A-bit integers, unsigned
    after a ReLU), with logistic noise of learned scale; multi-class straight-through
    gradients to the input, step, offset and noise, as for the weights. No DropBits gates
    on activations: every layer input keeps its A bits. In eval mode the same mode rule
    (deterministic), which ONNX export does not carry."""

    def __init__(self, bits: int, signed: bool, step: float, sigma_init: float = 1.0 / 3.0
                 ) -> None:
        super().__init__(bits, signed, step)
        qmin, qmax = self.levels()
        self.offset = nn.Parameter(torch.zeros(()))
        self.log_sigma = nn.Parameter(torch.tensor(math.log(self.step.item() * sigma_init)))
        self.register_buffer("index", torch.arange(qmin, qmax + 1, dtype=torch.float32),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        index = self.index.to(x.dtype)
        step = self.step.abs().clamp(min=MIN_STEP).to(x.dtype)
        return cpq_quantize(x, step, self.offset.to(x.dtype), self.log_sigma.exp().to(x.dtype),
                            torch.ones_like(index), index)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", cpq"


register_input_quantizer("log_sigma", CPQInputQuantizer)


def cpq_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, CPQQuantizer]]:
    """(qualified tensor name, module, attribute, quantizer) of every CPQ-quantized tensor."""
    for name, (module, quantizer) in find_parametrizations(model, CPQQuantizer).items():
        yield name, module, name.rpartition(".")[2], quantizer


def bit_widths(model: nn.Module) -> dict[str, int]:
    """Bit-width of each CPQ-quantized tensor under its deterministic gates."""
    return {name: q.active_bits() for name, _, _, q in cpq_quantizers(model)}


@register_method("cpq", config_class=CPQConfig, quantizer_class=CPQQuantizer, search_space=(
    {}, {"drop_rate": 0.3}, {"sigma_init": 0.1}, {"lr": 3e-4}))
class CPQMethod(ParametrizedMethod):
    """Mode-of-relaxed-quantization forward, multi-class STE backward, DropBits gates."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        quantizers = [q for _, q in self.quantizers(model).values()]
        grid = [p for q in quantizers for p in (q.log_step, q.offset, q.log_sigma)]
        gates = [q.gate_logits for q in quantizers if isinstance(q.gate_logits, nn.Parameter)]
        return [{"params": grid, "lr_scale": self.config.lr_scale},
                {"params": gates, "lr_scale": self.config.gate_lr_scale}]

    def lam(self, progress: Progress) -> float:
        return self.config.lam_bits

    def input_quantizer(self, bits: int, signed: bool, step: float) -> InputQuantizer | None:
        """CPQ's own activation path where `activations` is on; else the shared one."""
        if not self.config.activations:
            return None
        return CPQInputQuantizer(bits, signed, step, self.config.sigma_init)

    def check_act_bits(self, act_bits: int | None) -> None:
        if self.config.activations and act_bits is None:
            raise ConfigError("cpq's activations=True quantizes layer inputs at act_bits, "
                              "which is not set: give --act-bits A (2 to 16)")

    def regularizer(self, model: nn.Module, task_loss: Tensor, progress: Progress) -> Tensor:
        """L0 penalty: expected number of open DropBits gates over all tensors."""
        quantizers = [q for _, q in self.quantizers(model).values()]
        return sum((gate_prob_open(q.gate_logits).sum() for q in quantizers),
                   torch.zeros((), device=quantizers[0].log_step.device))

    def check_finalize_bits(self, bits: int) -> None:
        """cpq finalizes at its prepared bits or fewer: the deterministic gates keep at most
        `bits` levels."""
        if self.bits is not None and bits > self.bits:
            raise ConfigError(f"cpq was prepared for {self.bits} bits and cannot finalize at "
                              f"{bits}; use bits <= {self.bits}")
