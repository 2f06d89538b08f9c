"""`qareg`: learnable codebooks pulled together by the quantization-aware regularizer.

Each quantized tensor gets a codebook of k learnable representatives (`qareg.prepare`);
training adds `lambda(t) * qareg.penalty(model)` to the loss, and in the last
`snapped_fraction` of training the forward pass sees the snapped weights
(`qareg.straight_through`), so weights can change representative and the codebooks learn
from the task too. After training the codebooks stay and `qareg.convert` snaps to them.

With `snapped_fraction=0` and a large lambda this is the seed paper's method, the
regularizer alone. The defaults (lambda 1 with a linear ramp, snapped forward passes for
the whole run) were chosen on the validation split: BENCHMARKS.md, "qareg: snapped
forward passes".
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from qareg.budget import meet_budget, training_cuts
from qareg.constants import MAX_K, PENALTY_VARIANTS
from qareg.distributed import current_world, mean_over_ranks
from qareg.errors import ConfigError
from qareg.methods.base import Calibration, Grids, Method, Progress, register_method
from qareg.quantize import (
    check_patterns_match,
    penalty,
    prepare,
    quantized_tensors,
    require_codebooks,
    weighted_sum,
)
from qareg.rate import model_rate_bits
from qareg.sensitivity import fisher_sensitivity, gradient_sensitivity
from qareg.straight_through import straight_through
from qareg.validate import (
    check_bits_or_budget,
    check_bool,
    check_choice,
    check_float,
    check_init,
    check_int,
    check_patterns,
    is_budget,
)

LAMBDA_SCHEDULES = ("constant", "linear", "cosine", "exponential")
# budget_fisher: weight of the earlier measurements in each tensor's sensitivity, a moving
# average over renewals (one batch each) that follows the network without one batch's noise
SENSITIVITY_DECAY = 0.8


@dataclass(frozen=True)
class QaregConfig:
    """The quantization-aware regularizer: codebooks, penalty, lambda schedule and the
    snapped forward passes."""

    RENAMED: ClassVar[dict[str, str]] = {"straight_through": "snapped_fraction",
                                         "straight_through_lam": "snapped_lam"}

    k: int = 4  # representatives per quantized tensor (any k >= 2); bits b set k = 2**b
    init: str = "kmeans-exact"  # codebook init: one of qareg.cluster1d.INITS
    variant: str = "hard"  # penalty: hard (squared), soft (soft-min) or abs (absolute)
    temperature: float = 0.05  # soft variant only, at the start; in units of scale squared
    temperature_final: float | None = None  # soft: anneal geometrically to this; None: fixed
    lam: float = 1.0  # global lambda: loss = task + lambda(t) * sum of per-tensor terms
    lam_schedule: str = "linear"  # lambda(t): constant, or a linear, cosine or exponential ramp
    lam_start: float = 1e-3  # exponential ramp only: it starts at lam * lam_start
    ramp: float = 1.0  # fraction of training over which lambda ramps to `lam`
    codebook_lr_scale: float = 1.0  # codebook learning rate = lr * this
    # Fraction of training, at its end, whose forward passes see the snapped weights with
    # straight-through gradients to weights and codebooks (0: none; 1: the whole run).
    snapped_fraction: float = 1.0
    snapped_lam: float | None = None  # lambda in that phase; None: the schedule's
    include: tuple[str, ...] = ()  # glob patterns of tensors; empty: Conv and Linear weights
    exclude: tuple[str, ...] = ()  # glob patterns of tensors left in full precision
    layer_weights: dict[str, float] = field(default_factory=dict)  # pattern -> term weight
    zero: bool = False  # one representative per codebook pinned at exactly 0 (prunes)
    # weight of the rate term: loss = task + lambda(t) * (penalty + rate * estimated index
    # bits per weight, qareg.rate); 0: off. rate_temperature: its softness (scale squared)
    rate: float = 0.0
    rate_temperature: float = 0.05
    # weights per tensor the rate term reads each step: a strided subset of larger tensors
    # that turns with the step (qareg.rate.sampled); 0: every weight every step
    rate_sample: int = 1 << 16
    # stored bits per quantized weight the final file may take (indices entropy coded plus
    # codebooks; fractional allowed, e.g. 0.75): met after training by entropy-constrained
    # assignment (qareg.budget). Training starts from k = 2**ceil(budget) (at least 2).
    budget: float | None = None
    # with a budget: steps between updates of the entropy-constrained assignment that
    # training's snapped passes and penalty use (qareg.budget.training_cuts), so that the
    # network learns under the assignment its file will have; 0: the nearest rule until
    # the end, the budget met only after training
    budget_steps: int = 0
    # with a budget: representatives each codebook starts from (None: 2**ceil(budget), at
    # least 3 with a zero). More than the budget's bits lets the entropy-constrained
    # assignment keep more levels at the same rate (and drop those it does not need)
    budget_k: int | None = None
    # with budget_steps: weigh each tensor's distortion in the budget's assignment (training's
    # and the file's) by its sensitivity, measured from the task loss's gradient every
    # budget_steps steps (qareg.sensitivity.gradient_sensitivity), so that tensors the loss
    # reacts to most (a small first convolution) keep more bits at the same size; False: alike
    budget_fisher: bool = False
    # the power the sensitivities are raised to before they weigh distortions: 1 as measured,
    # below 1 their spread shrinks (cnn4's first convolution weighs about 3,000 times its
    # last per weight: a quadratic model of the loss trusted that far empties the last)
    budget_fisher_power: float = 1.0
    # with a budget: allocate by greedy descent on each tensor's staircase of assignments
    # (qareg.budget._descend), dead zones (its smallest weights, up to 98%, on a pinned zero)
    # among them, no tensor with more than 98% of its weights on one value; False: one
    # multiplier for the model and the entropy-constrained iteration alone, which under one
    # bit can let a neighbour absorb the zero or empty a tensor
    budget_dead_zones: bool = False
    # grouped codebooks (qareg.channel_groups): output channels per codebook (0: one per
    # tensor), and a fixed per-channel scale (each channel's RMS) under the codebook
    group_size: int = 0
    channel_scale: bool = False

    def __post_init__(self) -> None:
        check_int("k", self.k, 2, MAX_K)
        object.__setattr__(self, "init", check_init("init", self.init))
        check_choice("variant", self.variant, PENALTY_VARIANTS)
        check_float("temperature", self.temperature, 0, low_open=True)
        if self.temperature_final is not None:
            check_float("temperature_final", self.temperature_final, 0, low_open=True)
            if self.variant != "soft":  # would be ignored: only the soft-min has a temperature
                raise ConfigError(f"temperature_final only applies with variant soft; variant "
                                  f"is {self.variant!r}")
        check_float("lam", self.lam, 0)
        check_choice("lam_schedule", self.lam_schedule, LAMBDA_SCHEDULES)
        check_float("ramp", self.ramp, 0, 1, low_open=True)
        check_float("lam_start", self.lam_start, 0, 1, low_open=True)
        check_float("codebook_lr_scale", self.codebook_lr_scale, 0)
        check_float("snapped_fraction", self.snapped_fraction, 0, 1)
        check_bool("zero", self.zero)
        check_float("rate", self.rate, 0)
        check_float("rate_temperature", self.rate_temperature, 0, low_open=True)
        check_int("rate_sample", self.rate_sample, 0)
        check_int("budget_steps", self.budget_steps, 0)
        check_bool("budget_fisher", self.budget_fisher)
        check_bool("budget_dead_zones", self.budget_dead_zones)
        check_float("budget_fisher_power", self.budget_fisher_power, 0, 1)
        if self.budget_fisher and not self.budget_steps:
            raise ConfigError("budget_fisher weighs the assignment training renews every "
                              "budget_steps steps, but budget_steps is 0 (give budget_steps "
                              "> 0; without it the final assignment already weighs each "
                              "tensor by fisher_sensitivity on calibration batches)")
        if self.budget_k is not None:
            check_int("budget_k", self.budget_k, 3 if self.zero else 2, MAX_K)
        check_int("group_size", self.group_size, 0)
        check_bool("channel_scale", self.channel_scale)
        if self.budget is not None:
            check_float("budget", self.budget, 0, low_open=True)
            self.check_budget_allowed()
        if self.snapped_lam is not None:
            check_float("snapped_lam", self.snapped_lam, 0)
        object.__setattr__(self, "include", check_patterns("include", self.include))
        object.__setattr__(self, "exclude", check_patterns("exclude", self.exclude))
        if not isinstance(self.layer_weights, dict):
            raise ConfigError(f"layer_weights must map patterns to numbers, got "
                              f"{self.layer_weights!r}")
        for pattern, weight in self.layer_weights.items():
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"layer_weights keys must be non-empty glob patterns, got "
                                  f"{pattern!r}")
            check_float(f"layer_weights[{pattern!r}]", weight, 0)

    @property
    def grouped(self) -> bool:
        """Whether codebooks have groups or channel scales."""
        return self.group_size > 0 or self.channel_scale

    def check_budget_allowed(self) -> None:
        """A size budget reassigns plain codebooks only (`qareg.budget`)."""
        if self.grouped:
            raise ConfigError(f"a size budget needs plain codebooks: group_size "
                              f"{self.group_size} and channel_scale {self.channel_scale} "
                              "(allowed with a budget: group_size 0, channel_scale false)")

    def temperature_at(self, progress: float) -> float:
        """Soft-min temperature at `progress` in [0, 1] of training (geometric annealing)."""
        if self.temperature_final is None:
            return self.temperature
        return self.temperature * (self.temperature_final / self.temperature) ** progress

    def in_snapped_phase(self, progress: float) -> bool:
        """Whether `progress` in [0, 1) of training falls in the snapped-forward phase."""
        return progress >= 1 - self.snapped_fraction

    def lambda_at(self, progress: float) -> float:
        """lambda at `progress` in [0, 1] of training, following `lam_schedule` (and
        `snapped_lam` in the snapped-forward phase, when given)."""
        if self.snapped_lam is not None and self.in_snapped_phase(progress):
            return self.snapped_lam
        if self.lam_schedule == "constant":
            return self.lam
        ramp = min(1.0, progress / self.ramp)
        if self.lam_schedule == "linear":
            return self.lam * ramp
        if self.lam_schedule == "exponential":  # equal time in every decade of lambda
            return self.lam * self.lam_start ** (1 - ramp)
        return self.lam * (1 - math.cos(math.pi * ramp)) / 2


RegularizerConfig = QaregConfig  # the name of the last release, kept for one release


@register_method("qareg", config_class=QaregConfig, budgets=True, search_space=(
    {}, {"lam": 0.1}, {"lam": 10.0}, {"lr": 3e-4}))
class QaregMethod(Method):
    """Train with `lambda(t) * penalty(model)` and snapped forward passes; codebooks learn
    with the weights."""

    def resolve_bits(self, bits: int | float | None) -> int | float | None:
        """Any bits set k = 2**bits, and a fractional budget k = 2**ceil(budget), met after
        training (`qareg.budget`); without, the config's k decides. A k set apart from its
        default must agree with whole bits; `budget_k` needs a budget."""
        if bits is None:
            return None
        bits = check_bits_or_budget(bits)
        if is_budget(bits):
            self.config.check_budget_allowed()
        k = self.config.k
        if not is_budget(bits) and k != type(self.config).k and k != 2 ** bits:
            raise ConfigError(f"bits={bits} means k = {2 ** bits}, but k is {k}; give one of "
                              "them")
        if not is_budget(bits) and self.config.budget_k is not None:
            raise ConfigError(f"budget_k={self.config.budget_k} sets the codebooks a size "
                              f"budget starts from, but bits={bits} is whole (k = {2 ** bits}); "
                              "give a fractional budget such as 1.5, or no budget_k")
        return bits

    def budget_for(self, bits: int | float | None) -> float | None:
        """The stored-size budget at `bits`: a fractional `bits` itself, else the config's."""
        return bits if is_budget(bits) else self.config.budget

    def options(self) -> dict[str, Any]:
        """The config, with the k the codebooks have (2**bits once prepared at bits)."""
        return {**super().options(), "k": self.codebook_size(self.bits)}

    def codebook_size(self, bits: int | float | None) -> int:
        """k for `bits` (2**bits), or for the budget (`budget_k`, else 2**ceil(budget), at
        least 3 with a pinned zero: {0, c} alone would keep one sign), or the config's k."""
        budget = self.budget_for(bits)
        if bits is not None and not is_budget(bits):
            return 2 ** bits
        if budget is not None:
            if self.config.budget_k is not None:
                return self.config.budget_k
            return max(3 if self.config.zero else 2, 2 ** max(1, math.ceil(budget)))
        return self.config.k

    def prepare(self, model: nn.Module, bits: int | None, seed: int) -> None:
        """Codebooks of k representatives on the chosen tensors; a model that has codebooks
        already (fine-tuning a qareg network) keeps them, if their k is this one."""
        bits = self.resolve_bits(bits)
        super().prepare(model, bits, seed)
        c, k = self.config, self.codebook_size(bits)
        existing = {t.codebook.k for t in quantized_tensors(model)}
        if existing and existing != {k}:
            raise ConfigError(f"the model already has codebooks with k in {sorted(existing)}; "
                              f"k={k} does not match")
        if not existing:
            prepare(model, k, include=c.include or None, exclude=c.exclude, init=c.init,
                    seed=seed, zero=c.zero, group_size=c.group_size,
                    channel_scale=c.channel_scale)
        for t in quantized_tensors(model):  # fine-tuning a qareg network: this config decides
            t.codebook.zero = c.zero
        self._cuts_step: int | None = None  # the step training_cuts last ran at
        self._sensitivity: dict[str, float] | None = None  # budget_fisher's moving average
        check_patterns_match(c.layer_weights, [t.name for t in quantized_tensors(model)],
                             "layer_weights pattern")

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        codebooks = [t.codebook.normalized for t in require_codebooks(model)]
        return [{"params": codebooks, "lr_scale": self.config.codebook_lr_scale}]

    def forward_context(self, model: nn.Module, progress: Progress
                        ) -> AbstractContextManager[Any]:
        """Snapped forward passes in the last `snapped_fraction` of training; the penalty's
        terms found in the same pass where it can (`straight_through`'s `penalty_terms`)."""
        self._fused_terms: dict[str, Tensor] = {}
        self._update_cuts(model, progress)
        if self.config.in_snapped_phase(progress.fraction):
            return straight_through(model, self._fused_terms, self.config.variant)
        return nullcontext()

    def _cuts_due(self, progress: Progress) -> bool:
        """Whether training's budget assignment is renewed at this step: under a budget
        with `budget_steps`, every `budget_steps` steps and at the first of a run or a
        resume."""
        last = getattr(self, "_cuts_step", None)
        return (self.budget_for(self.bits) is not None and bool(self.config.budget_steps)
                and (last is None or progress.step - last >= self.config.budget_steps))

    def _update_cuts(self, model: nn.Module, progress: Progress) -> None:
        """Renew the assignment training uses, before the forward pass (with
        `budget_fisher`, after it: `_update_weighted_cuts`)."""
        if self.config.budget_fisher or not self._cuts_due(progress):
            return
        training_cuts(model, self.budget_for(self.bits),
                      dead_zones=self.config.budget_dead_zones)
        self._cuts_step = progress.step

    def _update_weighted_cuts(self, model: nn.Module, task_loss: Tensor,
                              progress: Progress) -> None:
        """`budget_fisher`: measure each tensor's sensitivity from this batch's task loss,
        fold it into the moving average (the same on every rank) and renew the assignment
        with it; the next forward pass uses it."""
        if not self.config.budget_fisher or not self._cuts_due(progress):
            return
        tensors = require_codebooks(model)
        measured = gradient_sensitivity(tensors, task_loss)
        values = mean_over_ranks(torch.tensor([measured[t.name] for t in tensors],
                                              dtype=torch.float64),
                                 current_world()).tolist()
        old = getattr(self, "_sensitivity", None)
        self._sensitivity = {t.name: value if old is None else
                             SENSITIVITY_DECAY * old[t.name] + (1 - SENSITIVITY_DECAY) * value
                             for t, value in zip(tensors, values, strict=True)}
        training_cuts(model, self.budget_for(self.bits), sensitivity=self._weights(),
                      dead_zones=self.config.budget_dead_zones)
        self._cuts_step = progress.step

    def _weights(self, sensitivity: dict[str, float] | None = None
                 ) -> dict[str, float] | None:
        """The weights of the tensors' distortions: `sensitivity` (by default budget_fisher's
        moving average) raised to `budget_fisher_power`."""
        if sensitivity is None:
            sensitivity = getattr(self, "_sensitivity", None)
        if sensitivity is None:
            return None
        power = self.config.budget_fisher_power
        return {name: value ** power for name, value in sensitivity.items()}

    def training_state(self) -> dict[str, Any]:
        """budget_fisher's moving-average sensitivities: a resumed run goes on averaging,
        and one resumed with no step left meets its budget with them."""
        sensitivity = getattr(self, "_sensitivity", None)
        return {} if sensitivity is None else {"sensitivity": dict(sensitivity)}

    def load_training_state(self, state: dict[str, Any]) -> None:
        if "sensitivity" in state:
            self._sensitivity = {str(k): float(v) for k, v in state["sensitivity"].items()}

    def lam(self, progress: Progress) -> float:
        return self.config.lambda_at(progress.fraction)

    def regularizer(self, model: nn.Module, task_loss: Tensor, progress: Progress) -> Tensor:
        c = self.config
        self._update_weighted_cuts(model, task_loss, progress)
        fused, self._fused_terms = getattr(self, "_fused_terms", {}), {}
        if fused:  # computed by this step's snapped forward pass, at the same weights
            term = weighted_sum(fused, c.layer_weights)
        else:
            term = penalty(model, c.variant, temperature=c.temperature_at(progress.fraction),
                           layer_weights=c.layer_weights)
        if c.rate > 0:
            term = term + c.rate * model_rate_bits(quantized_tensors(model), c.rate_temperature,
                                                   c.rate_sample, progress.step)
        return term

    def finalize(self, model: nn.Module, bits: int | None, calibration: Calibration = None
                 ) -> Grids:
        """The learned codebooks stay; `qareg.convert` snaps to them. With a budget, the
        weights are first reassigned to meet it (`qareg.budget.meet_budget`), each tensor's
        distortion weighted by its sensitivity measured on `calibration` when given; after
        training under the budget's assignment (`budget_steps`), by the rule training used
        (its last sensitivities with `budget_fisher`, else every tensor alike), so that the
        file keeps the assignment the network learned."""
        budget = self.budget_for(bits)
        if budget is not None:
            if self.config.budget_steps:
                weights = self._weights() if self.config.budget_fisher else None
            else:
                weights = (self._weights(fisher_sensitivity(model, calibration))
                           if calibration is not None else None)
            meet_budget(model, budget, weights, dead_zones=self.config.budget_dead_zones)
        return {t.name: t.codebook.representatives().detach() for t in require_codebooks(model)}
