"""Meeting a size budget: stored bits per quantized weight (entropy-coded indices plus
codebooks, averaged over all quantized weights), fractional budgets such as 0.75 included.

Entropy-constrained assignment (Chou, Lookabaugh and Gray, 1989): each weight w goes to the
representative c_j minimising

    ((w - c_j) / scale)^2 + mu * l_j,     l_j = -log2(q_j), q_j the share of weights on c_j,

so a weight near a boundary moves to the more frequent representative: a little more
distortion, fewer bits, and representatives that lose all their weights are dropped. One
`mu` for the whole model, found by bisection, makes the marginal cost of a bit the same in
every tensor: the allocation between tensors (and each tensor's effective k) follows from
it. With a measured sensitivity s_t per tensor (`qareg.sensitivity`: the loss grows by
about s_t / 2 per unit of squared scaled distortion), a tensor's distortion is weighted by
it, so sensitive tensors keep more bits. The codebooks keep their learned values; only
assignments and k change. A model already under its budget is left as it is.

Under one bit that multiplier fails two ways: iterated from the nearest rule, a neighbour of
a pinned zero with a larger share absorbs it (cnn4's last convolution: two values, a full
bit per weight), and a tensor priced low can end on one value. With `dead_zones` each
tensor instead gets a staircase of assignments (the nearest rule, the iteration at a ladder
of multipliers and, with a pinned zero, dead zones: its smallest 30% to 98% of weights on
the zero), none with more than 98% of the weights on one value, and the model descends them
greedily, one step of one tensor at a time, cheapest weighted distortion per bit saved
first, until it meets the budget; step by step, since dead zones make a tensor's curve
non-convex and one multiplier would leap across it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qareg.compress.bitpack import packed_size
from qareg.errors import ConfigError
from qareg.quantize import QuantizedTensor, require_codebooks
from qareg.validate import check_float

ROUNDS = 8  # assignment / share updates per tensor and mu
SAMPLE = 1 << 15  # weights per tensor that estimate the shares while training (training_cuts)
BISECTIONS = 40
CODEBOOK_BYTES = 4  # float32 representatives


def _envelope(centers: np.ndarray, costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower envelope of the parabolas (x - c_j)^2 + b_j, c ascending: the indices j that
    win somewhere, and the breakpoints between consecutive winners."""
    keep: list[int] = []
    cuts: list[float] = []
    for j in range(centers.size):
        while keep:
            i = keep[-1]
            cut = (centers[i] + centers[j]) / 2 + (costs[j] - costs[i]) / (
                2 * (centers[j] - centers[i]))
            if cuts and cut <= cuts[-1]:
                keep.pop()
                cuts.pop()
                continue
            cuts.append(cut)
            break
        keep.append(j)
    return np.array(keep), np.array(cuts)


def _assign(x: np.ndarray, centers: np.ndarray, mu: float, start: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Entropy-constrained assignment of `x` to `centers`, from the shares of `start`; and
    the (k - 1,) boundaries that make it (`_boundaries`)."""
    index = start
    for _ in range(ROUNDS):
        counts = np.bincount(index, minlength=centers.size).astype(np.float64)
        used = counts > 0
        lengths = np.full(centers.size, np.inf)
        lengths[used] = -np.log2(counts[used] / x.size)
        alive = np.flatnonzero(used)
        keep, cuts = _envelope(centers[alive], mu * lengths[alive])
        new = alive[keep][np.searchsorted(cuts, x, side="left")]
        converged = np.array_equal(new, index)
        index = new
        if converged:
            break
    return index, _boundaries(centers.size, alive[keep], cuts)


def _boundaries(k: int, winners: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """(k - 1,) boundaries between k representatives, of which `winners` (ascending) win
    between `cuts`: a representative that wins nowhere gets an empty interval (its two
    boundaries equal), so that counting the boundaries below a value gives its index."""
    bounds = np.empty(k - 1)
    bounds[:winners[0]] = -np.inf
    for i, cut in enumerate(cuts):
        bounds[winners[i]:winners[i + 1]] = cut
    bounds[winners[-1]:] = np.inf
    return bounds


def _index_bytes(counts: np.ndarray) -> float:
    """Bytes the stored index stream takes: the smaller of bit-packing at ceil(log2 k)
    and range coding (its 4 bytes of count per symbol, then about N H / 8 in 32-bit words),
    k the representatives in use."""
    counts = counts[counts > 0]
    n, k = counts.sum(), counts.size
    if k <= 1:
        return 0.0 if n == 0 else 4.0 * 2  # a lone symbol still takes a codebook of two
    entropy = -(counts * np.log2(counts / n)).sum() / 8
    ranged = 4 * k + 4 * math.ceil(entropy / 4)
    return float(min(packed_size(int(n), max(1, math.ceil(math.log2(k)))), ranged))


# Shares of a tensor's smallest weights that a dead-zone assignment puts on a pinned zero
# (the rest to the nearest nonzero representative), fine enough that a tensor's staircase
# (`_staircase`) moves in small steps of bits. With dead zones no tensor puts more than the
# last (98%) on one value: an emptied layer is a loss no quadratic model of the loss foresees.
DEAD_ZONE_SHARES = np.linspace(0.3, 0.98, 69)
MAX_SHARE = float(DEAD_ZONE_SHARES[-1])


@dataclass
class _DeadZones:
    """A tensor's dead-zone assignments (one per share of `DEAD_ZONE_SHARES`): the zero takes
    |x| up to each threshold."""

    zero: int  # the zero's index among the representatives
    thresholds: np.ndarray

    @staticmethod
    def of(x: np.ndarray, centers: np.ndarray) -> _DeadZones | None:
        """None without a pinned zero between two representatives."""
        zero = np.flatnonzero(centers == 0)
        if not zero.size or not 0 < zero[0] < centers.size - 1:
            return None
        return _DeadZones(int(zero[0]), np.quantile(np.abs(x), DEAD_ZONE_SHARES))

    def assignment(self, x: np.ndarray, centers: np.ndarray, threshold: float
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Indices and (k - 1,) boundaries with |x| <= threshold on the zero, the rest on
        the nearest nonzero representative (one squeezed out wins nowhere)."""
        z = self.zero
        bounds = (centers[1:] + centers[:-1]) / 2
        bounds[:z] = np.minimum(bounds[:z], -threshold)
        bounds[z:] = np.maximum(bounds[z:], threshold)
        bounds[z - 1], bounds[z] = -threshold, threshold
        return np.searchsorted(bounds, x, side="left"), bounds


@dataclass
class _Tensor:
    t: QuantizedTensor
    x: np.ndarray  # weights in units of the codebook's scale
    centers: np.ndarray  # representatives in the same units
    nearest: np.ndarray  # assignment by nearest representative
    sensitivity: float  # weight of this tensor's distortion against the model's bits
    count: int  # weights in the tensor (x may be a sample of them)
    dead_zones: _DeadZones | None  # the dead-zone assignments it may take

    def assign(self, mu: float) -> tuple[np.ndarray, np.ndarray]:
        """The entropy-constrained assignment at model multiplier `mu`, this tensor's
        distortion weighted by its sensitivity, and its boundaries (`_assign`)."""
        return _assign(self.x, self.centers, mu / max(self.sensitivity, 1e-30), self.nearest)

    def stored_bytes(self, index: np.ndarray) -> float:
        """Bytes of this tensor's indices and codebook under `index` (of x, scaled up)."""
        counts = np.bincount(index, minlength=self.centers.size) * (self.count / self.x.size)
        return _index_bytes(counts) + CODEBOOK_BYTES * max(2, int((counts > 0).sum()))

    def distortion(self, index: np.ndarray) -> float:
        """Squared scaled distortion of `index` over the whole tensor (x's, scaled up)."""
        return float(np.square(self.x - self.centers[index]).sum()) * self.count / self.x.size


def _stored_bits(states: list[_Tensor], mu: float) -> tuple[float, list[np.ndarray]]:
    total_bytes, assignments = 0.0, []
    for s in states:
        index = s.assign(mu)[0] if mu > 0 else s.nearest
        total_bytes += s.stored_bytes(index)
        assignments.append(index)
    weights = sum(s.count for s in states)
    return 8 * total_bytes / weights, assignments


def _states(model: nn.Module, sensitivity: Mapping[str, float] | None,
            sample: int | None = None, dead_zones: bool = False) -> list[_Tensor]:
    """Every quantized tensor of `model` as the assignment sees it: its weights in scale
    units (every `n // sample`-th of them with `sample`), representatives, nearest indices
    and sensitivity (and dead-zone assignments, with `dead_zones`). Any cuts of an earlier
    training are cleared: the nearest rule starts."""
    tensors = require_codebooks(model)
    grouped = [t.name for t in tensors if not t.codebook.plain]
    if grouped:
        raise ConfigError(f"a size budget needs plain codebooks; {', '.join(grouped[:5])} "
                          "have groups or channel scales (use group_size 0 and no "
                          "channel_scale with a budget)")
    sensitivity = dict(sensitivity or {})
    for name, value in sensitivity.items():
        check_float(f"sensitivity[{name!r}]", value, 0)
    states = []
    for t in tensors:
        t.codebook.project_()
        t.codebook.cuts = None
        scale = float(t.codebook.scale)
        flat = t.weight.detach().reshape(-1)
        step = 1 if sample is None else max(1, flat.numel() // sample)
        x = (flat[::step].double().cpu() / scale).numpy()
        centers = t.codebook.normalized.detach().double().cpu().numpy()
        nearest = t.codebook.assign(flat[::step]).cpu().numpy()
        states.append(_Tensor(t, x, centers, nearest, sensitivity.get(t.name, 1.0),
                              flat.numel(), _DeadZones.of(x, centers) if dead_zones else None))
    return states


# Multipliers of the iteration's points on a tensor's staircase (`_staircase`), in squared
# scaled distortion per bit per weight: from barely moving a weight to emptying the tensor.
LADDER = np.logspace(-3, 1.5, 28)


@dataclass
class _Point:
    """One assignment of a tensor: its stored bits and squared scaled distortion (whole
    tensor), and how to rebuild it: a dead zone's threshold, else the iteration's multiplier
    (0: the nearest rule)."""

    bits: float
    distortion: float
    threshold: float | None = None
    multiplier: float = 0.0


def _staircase(s: _Tensor) -> list[_Point]:
    """The assignments a tensor may take under a budget with dead zones, by bits descending,
    each with less distortion than every one after it (those beaten on both are dropped):
    the nearest rule first, then the entropy-constrained iteration at each multiplier of
    `LADDER` and, with a pinned zero, every dead zone; none but the nearest with more than
    `MAX_SHARE` of the weights on one value."""
    points = [_Point(8 * s.stored_bytes(s.nearest), s.distortion(s.nearest))]

    def add(index: np.ndarray, **how: Any) -> None:
        if np.bincount(index).max() <= MAX_SHARE * index.size:
            points.append(_Point(8 * s.stored_bytes(index), s.distortion(index), **how))

    for m in LADDER:
        add(_assign(s.x, s.centers, float(m), s.nearest)[0], multiplier=float(m))
    if s.dead_zones is not None:
        for threshold in s.dead_zones.thresholds:
            add(s.dead_zones.assignment(s.x, s.centers, threshold)[0],
                threshold=float(threshold))
    points.sort(key=lambda p: (p.bits, p.distortion))
    stairs: list[_Point] = []
    for p in points:  # bits ascending: keep what lowers the distortion
        if not stairs or p.distortion < stairs[-1].distortion:
            stairs.append(p)
    return stairs[::-1]


def _descend(states: list[_Tensor], bits_per_weight: float
             ) -> tuple[list[_Point], float]:
    """Greedy allocation on the tensors' staircases: from the nearest rule everywhere, move
    one tensor one step down at a time, always the step that costs the least sensitivity-
    weighted distortion per bit saved, until the model meets `bits_per_weight`. Step by
    step, so the bits never jump past the budget (the multiplier's lower envelope leaps
    across the non-convex parts of a tensor's curve, where dead zones put it). Returns each
    tensor's point and the price of the last step (0: nothing moved)."""
    stairs = [_staircase(s) for s in states]
    where = [0] * len(states)
    budget = bits_per_weight * sum(s.count for s in states)
    total = sum(st[0].bits for st in stairs)

    def price(i: int) -> float:
        here, below = stairs[i][where[i]], stairs[i][where[i] + 1]
        return (states[i].sensitivity * (below.distortion - here.distortion)
                / (here.bits - below.bits))

    heap = [(price(i), i) for i, st in enumerate(stairs) if len(st) > 1]
    heapq.heapify(heap)
    last = 0.0
    while total > budget:
        if not heap:
            raise ConfigError(f"bits_per_weight={bits_per_weight}: the model cannot be "
                              "stored that small (every tensor keeps two representatives "
                              f"and at most {MAX_SHARE:.0%} of its weights on one value)")
        last, i = heapq.heappop(heap)
        total -= stairs[i][where[i]].bits - stairs[i][where[i] + 1].bits
        where[i] += 1
        if where[i] + 1 < len(stairs[i]):
            heapq.heappush(heap, (price(i), i))
    return [st[w] for st, w in zip(stairs, where, strict=True)], last


def _rebuild(s: _Tensor, point: _Point) -> tuple[np.ndarray, np.ndarray | None]:
    """The indices (of x) and boundaries of `point` (None: the nearest rule)."""
    if point.threshold is not None:
        assert s.dead_zones is not None
        return s.dead_zones.assignment(s.x, s.centers, point.threshold)
    if point.multiplier == 0:
        return s.nearest, None
    return _assign(s.x, s.centers, point.multiplier, s.nearest)


def _multiplier(states: list[_Tensor], bits_per_weight: float) -> float:
    """The smallest mu (to bisection precision) whose assignment meets the budget; 0 when
    the nearest assignment already does."""
    if _stored_bits(states, 0.0)[0] <= bits_per_weight:
        return 0.0
    low, high = 0.0, 1.0
    while _stored_bits(states, high)[0] > bits_per_weight:
        high *= 4
        if high > 1e12:
            raise ConfigError(f"bits_per_weight={bits_per_weight}: the model cannot be "
                              "stored that small (every tensor keeps two representatives)")
    for _ in range(BISECTIONS):
        mid = (low + high) / 2
        low, high = (mid, high) if _stored_bits(states, mid)[0] > bits_per_weight else (
            low, mid)
    return high


@torch.no_grad()
def meet_budget(model: nn.Module, bits_per_weight: float,
                sensitivity: Mapping[str, float] | None = None, dead_zones: bool = False
                ) -> float:
    """Reassign the quantized weights of prepared `model` so that its stored index and
    codebook bits per quantized weight are at most `bits_per_weight`; snaps every weight and
    drops unused representatives (k shrinks, never below 2). `sensitivity` (tensor name ->
    weight, e.g. `fisher_sensitivity`) weights each tensor's distortion; by default all
    count alike. With `dead_zones` the allocation descends the tensors' staircases
    (`_descend`), dead zones included where a zero is pinned; without, one multiplier for
    the model, found by bisection, and the iteration alone. Returns the bits estimated for
    the file (the real file is within a few bytes per tensor of it)."""
    check_float("bits_per_weight", bits_per_weight, 0, low_open=True)
    states = _states(model, sensitivity, dead_zones=dead_zones)
    if dead_zones:
        points, _ = _descend(states, bits_per_weight)
        assignments = [_rebuild(s, p)[0] for s, p in zip(states, points, strict=True)]
        bits = 8 * sum(s.stored_bytes(i) for s, i in zip(states, assignments, strict=True)
                       ) / sum(s.count for s in states)
    else:
        bits, assignments = _stored_bits(states, _multiplier(states, bits_per_weight))
    for s, index in zip(states, assignments, strict=True):
        _apply(s.t, s.centers, index)
    return bits


def _apply(t: QuantizedTensor, centers: np.ndarray, index: np.ndarray) -> None:
    """Snap `t`'s weight to `centers[index]`, keeping only the representatives in use (at
    least two, and a pinned zero)."""
    used = np.flatnonzero(np.bincount(index, minlength=centers.size))
    if t.codebook.zero:  # the pinned 0 stays, used or not: projection would pin another
        used = np.union1d(used, np.flatnonzero(centers == 0))
    if used.size < 2:  # keep the neighbour too: a codebook has two values at least
        extra = used[0] + 1 if used[0] + 1 < centers.size else used[0] - 1
        used = np.sort(np.append(used, extra))
    remap = np.full(centers.size, -1)
    remap[used] = np.arange(used.size)
    codebook = t.codebook
    values = torch.from_numpy(centers[used]).to(codebook.normalized)
    codebook.normalized = nn.Parameter(values)
    weight: Tensor = t.weight
    snapped = (codebook.representatives().to(weight.dtype)[torch.from_numpy(
        remap[index]).to(weight.device)]).reshape(weight.shape)
    weight.copy_(snapped)


@torch.no_grad()
def training_cuts(model: nn.Module, bits_per_weight: float, sample: int = SAMPLE,
                  sensitivity: Mapping[str, float] | None = None, dead_zones: bool = False
                  ) -> float:
    """Set each codebook's `cuts` to the boundaries of the entropy-constrained assignment
    that meets `bits_per_weight` now (`meet_budget`'s, each tensor's distortion weighted by
    `sensitivity`, alike without, with `dead_zones` or not; shares estimated on every
    `n // sample`-th weight), so that snapped training passes and the penalty use the
    assignment the file will have, and the network learns under it. Returns the multiplier
    mu, or with `dead_zones` the price of the last step down (0: the nearest rule already
    meets the budget)."""
    check_float("bits_per_weight", bits_per_weight, 0, low_open=True)
    states = _states(model, sensitivity, sample, dead_zones)
    if dead_zones:
        points, price = _descend(states, bits_per_weight)
        for s, p in zip(states, points, strict=True):
            bounds = _rebuild(s, p)[1]
            s.t.codebook.cuts = None if bounds is None else torch.from_numpy(bounds)
        return price
    mu = _multiplier(states, bits_per_weight)
    if mu == 0:
        return mu
    for s in states:
        s.t.codebook.cuts = torch.from_numpy(s.assign(mu)[1])
    return mu
