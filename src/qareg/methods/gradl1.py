"""Gradient L1 regularization (Alizadeh et al., ICLR 2020) for quantization robustness.

Quantization perturbs a tensor by at most half a step in every entry; to first order the
loss then moves by at most half the step times the L1 norm of its gradient. Training with

    loss = task + lambda * sum over layers l of (||dL/dW_l||_1 + ||dL/dx_l||_1)

keeps those norms small, so one trained network can be quantized afterwards to 8, 6 or 4
bits without retraining (`bit_width_sweep`). The gradients come from double
backpropagation: `torch.autograd.grad(task, weights + activations, create_graph=True)`.

Which activations: the inputs x_l of the quantized Conv/Linear layers, not their outputs.
The inputs are what activation quantization rounds (`quantize_activations` quantizes the
same tensors), and an output captured by a hook is overwritten by the in-place ReLU that
follows it in most networks here, which would silently give the gradient after the ReLU. The
network's own input (data, no gradient) is left out.

Scale: the task loss is a batch mean, so dL/dx_l of each sample carries a factor 1/B, but
||dL/dx_l||_1 sums over the B samples: it is the mean over the batch of each sample's L1
norm, independent of the batch size (duplicating a batch leaves it unchanged; a test checks
this). ||dL/dW_l||_1 is the norm of the mean gradient, also a per-sample quantity. So no
renormalisation is needed, and one lambda serves every batch size. The sums over entries are
the paper's L1 norms, so the penalty grows with the network's size: lambda is per network.

Lambda and the optimizer (the paper's values are not recorded here): the L1 norm is not
smooth, its gradient sign(g) does not fade as g -> 0, so too large a step diverges. The
method fine-tunes with the common recipe, Adam at lr 1e-3, which beat SGD at lr 0.01 (the
earlier recipe) on Fashion-MNIST validation (the evidence: BENCHMARKS.md, "Defaults of the
rival methods"); a tuned bench also tries lambda 1e-4 and 1e-2 and lr 3e-4.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from qareg.activations import quantize_activations
from qareg.batchnorm import recalibrate_batchnorm
from qareg.constants import MAX_BITS
from qareg.data import DatasetSplits, TensorData
from qareg.errors import ConfigError, NotPreparedError, QaregError
from qareg.evaluation import evaluate
from qareg.methods.base import Calibration, Grids, Method, Progress, register_method
from qareg.quantize import select_tensors
from qareg.uniform import MAX_CLIP_RATIOS, quantize_weights_
from qareg.validate import check_bits, check_bool, check_float, check_int


def gradient_l1_norms(loss: Tensor, tensors: Sequence[Tensor], create_graph: bool = True
                      ) -> Tensor:
    """(len(tensors),) L1 norms of d loss / d tensor, differentiable (double backprop) when
    `create_graph`; a tensor the loss does not depend on gives 0."""
    grads = torch.autograd.grad(loss, list(tensors), create_graph=create_graph,
                                allow_unused=True)
    dtype = torch.promote_types(loss.dtype, torch.float32)  # bf16 gradients summed in fp32
    return torch.stack([torch.zeros((), dtype=dtype, device=loss.device) if g is None
                        else g.abs().sum(dtype=dtype) for g in grads])


class ActivationRecorder:
    """Forward pre-hook on each quantized layer: keeps its inputs during one forward pass
    with gradients (nothing under `torch.no_grad`), until `take()` or the next forward."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []  # this forward's layer inputs that require grad
        self.calls = 0  # layer calls with gradients enabled in this forward

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled():
            return
        self.calls += 1
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.requires_grad:
            self.inputs.append(x)

    def clear(self) -> None:
        self.inputs, self.calls = [], 0

    def take(self) -> tuple[list[Tensor], int]:
        """This forward's distinct inputs (a tensor fed to two layers counts once) and the
        number of layer calls; the recorder is emptied."""
        unique = list({id(x): x for x in self.inputs}.values())
        calls = self.calls
        self.clear()
        return unique, calls

    def __deepcopy__(self, memo: dict) -> ActivationRecorder:
        return ActivationRecorder()  # a copy of the model records its own forwards

    def __getstate__(self) -> dict[str, Any]:
        return {"inputs": [], "calls": 0}  # pickling a model saves no graph-bound tensors


class _NewForward:
    """Forward pre-hook on the root module: a new forward pass drops the last one's inputs."""

    def __init__(self, recorder: ActivationRecorder) -> None:
        self.recorder = recorder

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.recorder.clear()


def _our_hooks(model: nn.Module) -> list[tuple[nn.Module, int, Any]]:
    """(module, hook id, hook) of every gradl1 hook on `model` (found on the model itself, so
    that deep copies of a prepared model are handled too, like torch.nn.utils.prune does)."""
    return [(m, key, hook) for m in model.modules()
            for key, hook in m._forward_pre_hooks.items()
            if isinstance(hook, (ActivationRecorder, _NewForward))]


def remove_recorder(model: nn.Module) -> int:
    """Take the gradl1 hooks off `model`; returns how many there were."""
    hooks = _our_hooks(model)
    for module, key, _ in hooks:
        del module._forward_pre_hooks[key]
    return len(hooks)


def find_recorder(model: nn.Module) -> ActivationRecorder:
    """The recorder that `GradL1Method.prepare` attached to `model`."""
    found = {id(h): h for _, _, h in _our_hooks(model) if isinstance(h, ActivationRecorder)}
    if len(found) != 1:
        raise NotPreparedError("gradl1: the model is not prepared (GradL1Method.prepare attaches "
                         f"one activation recorder; found {len(found)})")
    return next(iter(found.values()))


def attach_recorder(model: nn.Module, names: Iterable[str]) -> ActivationRecorder:
    """Record the inputs of the modules owning the parameters `names`; replaces any
    recorder already on `model`."""
    remove_recorder(model)
    recorder = ActivationRecorder()
    model.register_forward_pre_hook(_NewForward(recorder))
    owners = {id(m): m for m in (model.get_submodule(n.rpartition(".")[0]) for n in names)}
    for module in owners.values():
        module.register_forward_pre_hook(recorder)
    return recorder


@dataclass(frozen=True)
class GradL1Config:
    """Gradient L1 regularization, then post-training uniform quantization per tensor."""

    lam: float = 1e-3  # loss = task + lam * (sum ||dL/dW||_1 + sum ||dL/dx||_1)
    start_epoch: int = 1  # 1-based epoch from which the penalty applies (double backprop)
    activations: bool = True  # include the layer inputs' gradients; False: weights only
    clip_ratios: int = 100  # post-training scale search over ratios i/n of max|w|; 1: max-abs

    def __post_init__(self) -> None:
        check_float("lam", self.lam, 0)
        check_int("start_epoch", self.start_epoch, 1)
        check_bool("activations", self.activations)
        check_int("clip_ratios", self.clip_ratios, 1, MAX_CLIP_RATIOS)


@register_method("gradl1", config_class=GradL1Config, post_training=True, search_space=(
    {}, {"lam": 1e-4}, {"lam": 1e-2}, {"lr": 3e-4}))
class GradL1Method(Method):
    """Train once with the gradient L1 penalty; uniform quantization at any bit-width after."""


    def prepare(self, model: nn.Module, bits: int | None, seed: int) -> None:
        super().prepare(model, bits, seed)
        self._recorder = attach_recorder(model, select_tensors(model))

    def lam(self, progress: Progress) -> float:
        c = self.config
        if c.start_epoch > progress.epochs:
            raise ConfigError(f"gradl1: start_epoch {c.start_epoch} is after the last epoch "
                              f"({progress.epochs}): the penalty would never apply")
        if progress.epoch >= c.start_epoch:
            return c.lam
        recorder = getattr(self, "_recorder", None)
        if recorder is not None:  # no regularizer this step: hold no tensors until the next
            recorder.clear()
        return 0.0

    def regularizer(self, model: nn.Module, task_loss: Tensor, progress: Progress) -> Tensor:
        weights = [model.get_parameter(n) for n in select_tensors(model)]
        inputs, calls = find_recorder(model).take()
        if calls == 0:
            raise QaregError("gradl1: no layer ran with gradients since the last step; the "
                             "regularizer needs the forward pass of `task_loss`")
        tensors = weights + inputs if self.config.activations else weights
        return gradient_l1_norms(task_loss, tensors).sum()

    def finalize(self, model: nn.Module, bits: int, calibration: Calibration = None) -> Grids:
        check_bits(bits)
        remove_recorder(model)
        self._recorder = None
        return quantize_weights_(model, bits, clip_ratios=self.config.clip_ratios)


@torch.no_grad()
def bit_width_sweep(
    model: nn.Module,
    splits: DatasetSplits,
    weight_bits: Sequence[int] = (8, 6, 4),
    activation_bits: str | Sequence[int] | None = None,
    per_channel: bool = False,
    calibration: Iterable | None = None,
    *,
    data: TensorData | None = None,
    calibration_batches: int = 8,
    clip_ratios: int = 100,
    percentile: float = 99.99,
) -> list[dict[str, Any]]:
    """Accuracy (percent, on `data`, default `splits.test`) of copies of `model` quantized
    after training at each of `weight_bits`, with no retraining; `model` is left as it is.

    Weights: uniform per tensor or per output channel. `activation_bits`: None (full
    precision), "same" (the weight bits) or one bit-width per entry of `weight_bits`;
    activations are quantized with `quantize_activations`, calibrated on the first
    `calibration_batches` of `calibration` (e.g. `qareg.evaluation.bn_loader(splits, config)`),
    which also re-estimate batch norm when given. Returns one row per bit-width.
    """
    weight_bits = [check_bits(b) for b in weight_bits]
    if activation_bits == "same":
        activation_bits = list(weight_bits)
    elif activation_bits is None:
        activation_bits = [None] * len(weight_bits)
    elif isinstance(activation_bits, str) or len(activation_bits) != len(weight_bits):
        raise ConfigError(f"activation_bits must be None, 'same' or one bit-width per weight "
                          f"bit-width {list(weight_bits)}; got {activation_bits!r}")
    for b in activation_bits:
        if b is not None:
            check_int("activation_bits", b, 2, MAX_BITS)
    check_bool("per_channel", per_channel)
    check_int("calibration_batches", calibration_batches, 1)
    batches = list(islice(calibration, calibration_batches)) if calibration is not None else []
    if calibration is not None and not batches:
        raise ConfigError("bit_width_sweep: calibration gave no batches")
    if any(b is not None for b in activation_bits) and not batches:
        raise ConfigError("bit_width_sweep: activation quantization needs calibration "
                          "batches (e.g. qareg.evaluation.bn_loader(splits, config))")
    data = splits.test if data is None else data
    device = next(model.parameters()).device
    rows = []
    for w_bits, a_bits in zip(weight_bits, activation_bits, strict=True):
        quantized = _copy_plain(model)
        quantize_weights_(quantized, w_bits, per_channel, clip_ratios)
        if batches:
            recalibrate_batchnorm(quantized, batches)
        handle = (quantize_activations(quantized, a_bits, batches, percentile)
                  if a_bits is not None else None)
        accuracy = evaluate(quantized, data, splits, device)
        if handle is not None:
            handle.remove()
        rows.append({"weight_bits": w_bits, "activation_bits": a_bits,
                     "per_channel": per_channel, "accuracy": accuracy})
    return rows


def _copy_plain(model: nn.Module) -> nn.Module:
    """A deep copy of `model` without gradl1's recording hooks."""
    duplicate = copy.deepcopy(model)
    remove_recorder(duplicate)
    return duplicate
