"""prepare / penalty / convert over a whole model.

`prepare` attaches a `Codebook` beside each chosen parameter (as `<name>_codebook` on the
module that owns it), `penalty` sums the per-tensor regularization terms, and `convert`
snaps every chosen tensor to its representatives and reports what it did.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qareg.batchnorm import batchnorm_layers, recalibrate_batchnorm
from qareg.channel_groups import group_bounds, group_count
from qareg.codebook import Codebook
from qareg.constants import CODEBOOK_SUFFIX, DEFAULT_LAYERS, MAX_K
from qareg.errors import ConfigError, NotPreparedError, QaregWarning
from qareg.penalties import VARIANTS, tensor_penalty
from qareg.validate import check_init

FilterFn = Callable[[str, nn.Parameter, nn.Module], bool]


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized parameter: its qualified name, the module owning it, and its codebook."""

    name: str
    module: nn.Module
    attribute: str
    codebook: Codebook

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.attribute)


def quantized_tensors(model: nn.Module) -> list[QuantizedTensor]:
    """Every parameter of `model` that has a codebook, in module order."""
    found = []
    for prefix, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, Codebook) and child_name.endswith(CODEBOOK_SUFFIX):
                attribute = child_name[: -len(CODEBOOK_SUFFIX)]
                name = f"{prefix}.{attribute}" if prefix else attribute
                found.append(QuantizedTensor(name, module, attribute, child))
    return found


def parameter_candidates(model: nn.Module) -> dict[str, tuple[nn.Module, str, nn.Parameter]]:
    """Parameters that may be quantized (not codebooks), by qualified name: (owning module,
    attribute, parameter)."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, Codebook):
            continue
        for attribute, param in module.named_parameters(recurse=False):
            out[f"{prefix}.{attribute}" if prefix else attribute] = (module, attribute, param)
    return out


def _first_match(name: str, patterns: Mapping[str, object]) -> object | None:
    for pattern, value in patterns.items():
        if fnmatch.fnmatchcase(name, pattern):
            return value
    return None


def check_patterns_match(patterns: Iterable[str], names: Sequence[str], what: str) -> None:
    """Every glob pattern must match one of `names`; the error lists them."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
            raise ConfigError(f"{what} {pattern!r} matches no parameter; parameters: {shown}")


def _check_k(k: object, where: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= MAX_K:
        raise ConfigError(f"k{where} must be an integer from 2 to {MAX_K}, got {k!r}")
    return k


def select_tensors(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    filter_fn: FilterFn | None = None,
) -> list[str]:
    """Qualified names of the parameters to quantize.

    By default the weights of every Conv and Linear layer; `include` (glob patterns on
    names such as "features.*.weight"), or `filter_fn(name, param, module)`, choose others;
    `exclude` patterns remove names from the choice.
    """
    candidates = parameter_candidates(model)
    names = list(candidates)
    check_patterns_match(include or (), names, "include pattern")
    check_patterns_match(exclude, names, "exclude pattern")
    chosen = []
    for name, (module, attribute, param) in candidates.items():
        if filter_fn is not None:
            keep = filter_fn(name, param, module)
        elif include:
            keep = any(fnmatch.fnmatchcase(name, p) for p in include)
        else:
            keep = attribute == "weight" and isinstance(module, DEFAULT_LAYERS)
        if keep and not any(fnmatch.fnmatchcase(name, p) for p in exclude):
            chosen.append(name)
    if not chosen:
        raise ConfigError("no parameter selected for quantization; parameters: " + ", ".join(names))
    return chosen


def prepare(
    model: nn.Module,
    k: int = 4,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    filter_fn: FilterFn | None = None,
    k_per_tensor: Mapping[str, int] | None = None,
    init: str = "kmeans-exact",
    seed: int = 0,
    zero: bool = False,
    group_size: int = 0,
    channel_scale: bool = False,
) -> nn.Module:
    """Attach a learnable codebook of `k` representatives to each chosen tensor; returns `model`.

    Tensors are chosen by `select_tensors` (Conv and Linear weights by default);
    `k_per_tensor` maps glob patterns to k for some tensors (first match wins); `init` is one
    of "linear", "quantile", "kmeans++", "kmeans-exact" (the exact optimum, `kmeans1d`; the
    default) or "kmeans-lloyd" (Lloyd's local search from quantiles). With `zero`, every
    codebook keeps one representative at exactly 0 (`Codebook`).
    """
    _check_k(k, "")
    k_per_tensor = dict(k_per_tensor or {})
    for pattern, value in k_per_tensor.items():
        _check_k(value, f" for {pattern!r}")
    init = check_init("init", init)
    chosen = select_tensors(model, include, exclude, filter_fn)
    check_patterns_match(k_per_tensor, chosen, "k_per_tensor pattern")
    candidates = parameter_candidates(model)
    plan = []
    for name in chosen:
        module, attribute, param = candidates[name]
        tensor_k = _first_match(name, k_per_tensor) or k
        if hasattr(module, attribute + CODEBOOK_SUFFIX):
            raise ConfigError(f"tensor {name!r} already has a codebook: prepare was called twice")
        if (group_size or channel_scale) and param.ndim == 0:
            raise ConfigError(f"tensor {name!r} is a scalar: it has no output channels to "
                              "group or scale")
        groups = group_count(param.shape[0], group_size) if group_size else 1
        smallest = param.numel()  # entries of its smallest group
        if groups > 1:
            channels = min(end - first for first, end in group_bounds(len(param), groups))
            smallest = channels * (param.numel() // len(param))
        if tensor_k > smallest:
            raise ConfigError(
                f"k={tensor_k} is larger than tensor {name!r} with {smallest} entries"
                + (" in its smallest group" if groups > 1 else "")
                + "; k must be at most the number of entries"
            )
        plan.append((module, attribute, param, tensor_k, groups))
    generator = torch.Generator().manual_seed(seed)
    for module, attribute, param, tensor_k, groups in plan:  # validated: all or nothing
        codebook = Codebook.fit(param, tensor_k, init, generator, zero=zero, groups=groups,
                                channel_scale=channel_scale)
        module.add_module(attribute + CODEBOOK_SUFFIX, codebook)
    return model


def prepare_like(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Attach empty codebooks wherever `state_dict` (of a prepared model) has one, so that
    `model.load_state_dict(state_dict)` then restores them."""
    candidates = parameter_candidates(model)
    key_end = CODEBOOK_SUFFIX + ".normalized"
    for key, value in state_dict.items():
        if not key.endswith(key_end):
            continue
        name = key[: -len(key_end)]
        if name not in candidates:
            raise ConfigError(f"state dict has a codebook for {name!r}, which the model lacks")
        module, attribute, param = candidates[name]
        scales = state_dict.get(key[: -len(".normalized")] + ".channel_scale")
        groups = value.shape[0] if value.ndim == 2 else 1
        codebook = Codebook(value.shape[-1], groups=groups,
                            channels=0 if scales is None else scales.numel()).to(param.device)
        module.add_module(attribute + CODEBOOK_SUFFIX, codebook)
    return model


def require_codebooks(model: nn.Module) -> list[QuantizedTensor]:
    """`quantized_tensors(model)`, which must not be empty."""
    tensors = quantized_tensors(model)
    if not tensors:
        raise NotPreparedError("the model has no codebooks: call qareg.prepare(model, k=...) "
                               "first")
    return tensors


def penalty_terms(
    model: nn.Module, variant: str = "hard", *, temperature: float = 0.05
) -> dict[str, Tensor]:
    """The unweighted regularization term of every quantized tensor, by name."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown penalty variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ConfigError(f"temperature must be a positive number, got {temperature!r}")
    terms = {}
    for t in require_codebooks(model):
        t.codebook.project_()
        if t.codebook.plain:
            terms[t.name] = tensor_penalty(
                variant, t.weight, t.codebook.representatives(), t.codebook.scale, temperature,
                t.codebook.boundaries(t.weight.dtype),
            )
            continue
        terms[t.name] = sum(  # grouped: each group's term, weighted by its share
            share * tensor_penalty(variant, part, row, t.codebook.scale, temperature)
            for part, row, share in t.codebook.parts(t.weight))
    return terms


def penalty(
    model: nn.Module,
    variant: str = "hard",
    *,
    temperature: float = 0.05,
    layer_weights: Mapping[str, float] | None = None,
) -> Tensor:
    """The regularization term to add to your loss: sum over quantized tensors of
    layer_weight * term. `layer_weights` maps glob patterns to weights (first match wins,
    default 1). Variants: "hard" (squared distance to the nearest representative), "soft"
    (soft-min at `temperature`), "abs" (absolute distance)."""
    return weighted_sum(penalty_terms(model, variant, temperature=temperature), layer_weights)


def weighted_sum(terms: Mapping[str, Tensor], layer_weights: Mapping[str, float] | None = None
                 ) -> Tensor:
    """sum over tensors of layer_weight * term, `terms` by tensor name (as
    `penalty_terms` gives them); `layer_weights` as in `penalty`."""
    layer_weights = dict(layer_weights or {})
    for pattern, weight in layer_weights.items():
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"layer weight for {pattern!r} must be >= 0, got {weight!r}")
    check_patterns_match(layer_weights, list(terms), "layer_weights pattern")
    total = None
    for name, term in terms.items():
        weight = _first_match(name, layer_weights)
        weighted = term if weight is None else float(weight) * term
        total = weighted if total is None else total + weighted
    return total


@dataclass(frozen=True)
class TensorReport:
    """What convert did to one tensor."""

    name: str
    shape: tuple[int, ...]
    k: int
    bits: int  # bits per index: ceil(log2 k)
    distinct: int  # distinct values after snapping (<= k)
    mse: float  # mean squared change of the entries
    relative_mse: float  # mse over the mean square of the entries before snapping
    zeros: int = 0  # entries exactly 0 after snapping (a representative pinned at 0)

    @property
    def sparsity(self) -> float:
        """Fraction of the entries that are exactly 0 after snapping."""
        return self.zeros / max(1, self.numel)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ConversionReport:
    """Per-tensor reports of one convert, with totals."""

    tensors: tuple[TensorReport, ...]
    batchnorm_batches: int  # batches used to re-estimate batch-norm statistics (0: none)

    @property
    def quantized_weights(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """Index bits per quantized weight, averaged over all quantized weights."""
        return sum(t.bits * t.numel for t in self.tensors) / self.quantized_weights

    @property
    def sparsity(self) -> float:
        """Fraction of all quantized weights that are exactly 0 after snapping."""
        return sum(t.zeros for t in self.tensors) / max(1, self.quantized_weights)

    def format_table(self) -> str:
        header = (f"{'tensor':<32} {'shape':<18} {'k':>6} {'bits':>4} {'distinct':>8} "
                  f"{'rel.mse':>9} {'zeros':>6}")
        lines = [header, "-" * len(header)]
        for t in self.tensors:
            shape = "x".join(map(str, t.shape))
            lines.append(
                f"{t.name:<32} {shape:<18} {t.k:>6} {t.bits:>4} {t.distinct:>8} "
                f"{t.relative_mse:>9.2e} {t.sparsity:>6.1%}"
            )
        lines.append(
            f"{self.quantized_weights} weights quantized, {self.bits_per_weight:.2f} bits/weight, "
            f"{self.sparsity:.1%} zeros"
            + (f", batch norm re-estimated on {self.batchnorm_batches} batches"
               if self.batchnorm_batches else "")
        )
        return "\n".join(lines)


@torch.no_grad()
def convert(
    model: nn.Module,
    bn_batches: Iterable | None = None,
    *,
    bn_max_batches: int | None = None,
) -> ConversionReport:
    """Replace each quantized tensor by its representatives, then re-estimate batch-norm
    statistics on `bn_batches` (training inputs, or (inputs, labels) pairs, on the model's
    device). Codebooks stay attached, so the indices can be recovered for storage. A
    codebook trained under a budget's assignment (`Codebook.cuts`) snaps by it, then drops
    it: each weight then sits on its value, which the nearest rule maps back to."""
    reports = []
    for t in require_codebooks(model):
        t.codebook.project_()
        weight = t.weight
        indices = t.codebook.assign(weight)
        snapped = t.codebook.dequantize(indices, weight.dtype)
        mse = (weight - snapped).double().square().mean().item()
        mean_square = weight.double().square().mean().item()
        weight.copy_(snapped)
        t.codebook.cuts = None  # every weight is now on its value: the nearest rule keeps it
        distinct = int((torch.bincount(indices.flatten(), minlength=t.codebook.k) > 0).sum())
        reports.append(TensorReport(
            name=t.name,
            shape=tuple(weight.shape),
            k=t.codebook.k,
            bits=t.codebook.bits,
            distinct=distinct,
            mse=mse,
            relative_mse=mse / mean_square if mean_square > 0 else 0.0,
            zeros=int((snapped == 0).sum()),
        ))
    used = 0
    if bn_batches is not None:
        used = recalibrate_batchnorm(model, bn_batches, bn_max_batches)
    elif batchnorm_layers(model):
        warnings.warn(
            "convert: batch-norm statistics were not re-estimated (pass bn_batches=training "
            "batches); snapping shifts them and usually costs accuracy",
            QaregWarning, stacklevel=2,
        )
    return ConversionReport(tuple(reports), used)
