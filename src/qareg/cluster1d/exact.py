"""Exact, globally optimal 1-D k-means: `kmeans1d(values, k)`.

An optimal clustering of numbers cuts their sorted order into k runs, so dynamic
programming over cut positions finds it. This module avoids the O(N log N) sort (on 15M
weights the sort alone takes longer than the whole method): it bins the values by their
bit patterns, bounds the optimum from above and below with programmes over bins, and
refines only the bins where an optimal cut may still lie (see `kmeans1d`). The compiled
loops use numba (single-threaded).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from qareg.cluster1d.exact_kernels import gather, histogram, min_plus, next_states, prefix_sums
from qareg.errors import ConfigError


class KMeansTooLarge(ConfigError):
    """k times the number of bins is beyond what the exact method lists."""


_FIRST_BITS = 16  # key bits of the first round: at most 65536 bins, whatever N is
_MAX_BINS = 1 << 15  # slots of a later round's histogram (64 bytes each: 2 MB, in cache)
_MAX_GROWTH = 1 << 20  # listed states after a refinement, at most about this many
_MAX_LISTED = 1 << 24  # positions listed in the first round, about k x bins (~1 GB of work)


# Notation: the values' *atoms* are bins of consecutive values in sorted order; a cluster
# boundary (a *cut*) lies either between two atoms or inside one. State 2a is "the cut lies
# just before atom a" (state 2A: after the last atom), state 2a + 1 is "the cut lies inside
# atom a". Costs come from prefix sums over states.


class _Atoms(NamedTuple):
    """Bins of consecutive values in sorted order."""

    count: np.ndarray  # (A,) int64
    first: np.ndarray  # (A,) float64 some value of the atom (the first one binned)
    sums: np.ndarray  # (A,) sum of (value - first)
    squares: np.ndarray  # (A,) sum of (value - first)^2
    low: np.ndarray  # (A,) smallest value
    high: np.ndarray  # (A,) largest value; low == high: a single distinct value
    slot: np.ndarray  # (A,) int64 slot in this round's histogram; -1: frozen (no cut inside)

    def moments(self, shift: float) -> tuple[np.ndarray, np.ndarray]:
        """Sums of (value - shift) and of its square, (A,) each."""
        d = self.first - shift
        return self.sums + self.count * d, self.squares + (2 * self.sums + self.count * d) * d

    def means(self, starts: np.ndarray) -> np.ndarray:
        """Mean value of each run of atoms starts[j] .. starts[j + 1] - 1 (the last to the
        end; starts[0] = 0), summed about the run's first atom: a run of one distinct value
        gives that value exactly."""
        assert starts[0] == 0, f"runs must cover every atom, got starts {starts}"
        origin = self.first[starts]  # (runs,)
        per_atom = np.repeat(origin, np.diff(np.append(starts, self.count.size)))
        sums = self.sums + self.count * (self.first - per_atom)
        return origin + np.add.reduceat(sums, starts) / np.add.reduceat(self.count, starts)


def _atoms_from_histogram(stats: np.ndarray) -> _Atoms:
    slot = np.flatnonzero(stats[:, 0])
    n, s, q, first, low, high = stats[slot, :6].T
    return _Atoms(n.astype(np.int64), first, s, q, low, high, slot)


def _prefixes(atoms: _Atoms, shift: float, relaxed: bool):
    """Prefix sums over states (2A + 1,) of count, sum and sum of squares of the values
    minus `shift` (their mean: differences of sums about it lose least), and a constant.

    Exact: atom a is one item between states 2a and 2a + 1. Relaxed: an atom with distinct
    values becomes two items at its min and max, with its count and sum (the lever rule).
    For any centres, f(x) = min_c (x - c)^2 is x^2 plus a concave function, so on [min, max]
    it lies above its chord: the atom costs at least its two items plus the constant
    sum(x^2) - (w_lo min^2 + w_hi max^2) <= 0, with equality when it goes to one centre.
    The items sit at the atom's own extreme values, so under the optimal centres they fall
    on the same side of every cut as those values: the optimal clustering's cuts, a cut
    inside atom a being state 2a + 1 (between its items), cost at most the optimum in the
    relaxed problem, constants added. Bounds from true min and max matter here: a bin's
    key range would reach across a cut lying just outside the bin.
    """
    n, (s, q) = atoms.count.astype(np.float64), atoms.moments(shift)
    items = np.zeros((3, 2 * n.size))  # (count, sum, square) x items in order
    items[:, 0::2] = n, s, q
    constant = 0.0
    if relaxed:
        lo, hi = atoms.low - shift, atoms.high - shift
        split = hi > lo
        width = np.where(split, hi - lo, 1.0)
        w_hi = np.where(split, np.clip((s - n * lo) / width, 0.0, n), 0.0)
        w_lo = n - w_hi
        items[:, 0::2] = np.where(split, [w_lo, w_lo * lo, w_lo * lo * lo], items[:, 0::2])
        items[:, 1::2] = np.where(split, [w_hi, w_hi * hi, w_hi * hi * hi], 0.0)
        constant = float(np.sum(np.where(split, q - w_lo * lo * lo - w_hi * hi * hi, 0.0)))
    count, sums, squares = prefix_sums(items)
    return count, sums, squares, constant


def _all_states(atoms: _Atoms, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Lists m = 0..k: state 0, then every state k - 1 times, then the end state."""
    end = 2 * atoms.count.size
    inside = np.zeros(end + 1, dtype=bool)
    inside[1::2] = atoms.high > atoms.low
    every = np.flatnonzero((np.arange(end + 1) % 2 == 0) | inside)
    states = np.concatenate([[0], np.tile(every, k - 1), [end]])
    offsets = np.concatenate([[0, 1], 1 + every.size * np.arange(1, k), [states.size]])
    return states.astype(np.int64), offsets.astype(np.int64)


def _sublists(states: np.ndarray, offsets: np.ndarray, keep: np.ndarray):
    which = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    counts = np.bincount(which[keep], minlength=offsets.size - 1)
    return states[keep], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _lower_bounds(states, offsets, prefix) -> np.ndarray:
    """Relaxed cost of the best clustering whose m-th cut is at each listed state."""
    count, sums, squares = prefix
    forward = min_plus(states, offsets, count, sums, squares, False, False)[0]
    # the same on the mirrored problem: items reversed, state s becomes end - s
    end, lengths = count.size - 1, np.diff(offsets)
    which = np.repeat(np.arange(lengths.size), lengths)
    mirrored_offsets = np.concatenate([[0], np.cumsum(lengths[::-1])]).astype(np.int64)
    position = (mirrored_offsets[lengths.size - 1 - which] + lengths[which] - 1
                - (np.arange(states.size) - offsets[which]))
    mirrored = np.empty_like(states)
    mirrored[position] = end - states
    flipped = [p[-1] - p[::-1] for p in prefix]
    backward = min_plus(mirrored, mirrored_offsets, *flipped, False, False)[0]
    return forward + backward[position]


def _prune(atoms: _Atoms, shift: float, states: np.ndarray, offsets: np.ndarray):
    """The listed states that may still hold the m-th cut of an optimal clustering: those
    whose lower bound is not above the cost of the best clustering with cuts between atoms,
    give or take rounding."""
    exact = _prefixes(atoms, shift, relaxed=False)[:3]
    between = states % 2 == 0
    upper = min_plus(*_sublists(states, offsets, between), *exact, False, False)[0][-1]
    *relaxed, constant = _prefixes(atoms, shift, relaxed=True)
    lower = _lower_bounds(states, offsets, relaxed) + constant
    # Each bound sums at most k + 1 costs from compensated prefix sums: its rounding error is
    # a few eps x (sum of squares + max |v| x sum |v|) over the items, v = value - shift.
    reach = np.maximum(np.abs(atoms.low - shift), np.abs(atoms.high - shift))  # (A,)
    margin = 32 * (offsets.size + 1) * np.finfo(np.float64).eps * (
        relaxed[2][-1] + reach.max() * (atoms.count @ reach))
    return _sublists(states, offsets, lower <= upper + margin)


def _split(atoms: _Atoms, refined: np.ndarray, sub: _Atoms, nb: int):
    """The atoms with each refined one replaced by its sub-atoms (their slots carry the
    refined atom's rank in their top bits), and first (A + 1,): the new index of each old
    atom's first piece."""
    owner = np.flatnonzero(refined)[sub.slot >> nb]  # (sub-atoms,) old index, sorted
    pieces = np.ones(atoms.count.size, np.int64)
    pieces[refined] = np.bincount(sub.slot >> nb, minlength=int(refined.sum()))
    first = np.concatenate([[0], np.cumsum(pieces)])
    rank = np.arange(owner.size) - np.searchsorted(owner, owner)  # among its siblings
    frozen = np.flatnonzero(~refined)
    columns = [np.empty(first[-1], column.dtype) for column in atoms]
    for column, old, fresh in zip(columns, atoms, sub, strict=True):
        column[first[frozen]] = old[frozen]
        column[first[owner] + rank] = fresh
    columns[-1][first[frozen]] = -1  # no cut inside them: never refined again
    return _Atoms(*columns), first


def _as_flat_array(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        v = values.detach().flatten().cpu()
        v = v if v.dtype in (torch.float32, torch.float64) else v.double()
        return v.contiguous().numpy()
    v = np.ravel(np.asarray(values))
    return np.ascontiguousarray(v if v.dtype in (np.float32, np.float64) else v.astype(np.float64))


def _distinct_padded(x: np.ndarray, k: int) -> Tensor:
    distinct = np.unique(x.astype(np.float64))  # -0.0 == 0.0: one value
    assert distinct.size < k or k >= x.size, f"{distinct.size} distinct values, k = {k}"
    padded = np.concatenate([distinct, np.full(max(0, k - distinct.size), distinct[-1])])
    return torch.from_numpy(padded[:k])


def kmeans1d(values: Tensor | np.ndarray, k: int) -> Tensor:
    """The k representatives (sorted, float64, shape (k,)) of the globally optimal k-means
    clustering of `values`: the least sum of squared distances to the nearest one, up to
    float64 rounding in the sums. With fewer than k distinct values, they come first and
    the largest is repeated (sum of squares 0; `Codebook.project_` spreads the copies).

    An optimal 1-D clustering cuts the sorted values into k runs. Instead of sorting, one
    pass bins the values by the top 16 bits of their IEEE sort key; a dynamic programme over
    bins gives an upper bound (cuts between bins) and, for every cut index m and position,
    a lower bound (each bin that may hold a cut is relaxed to two weighted points at its
    ends, see `_prefixes`). Positions whose bound exceeds the upper bound cannot hold the
    m-th cut of any optimal clustering; only bins that still may are split by their next
    key bits, their values gathered, and the round repeats until no bin may hold a cut. A
    last programme over the surviving positions is then exact. Each programme is solved
    list by list with monotone divide and conquer (the costs are Monge).

    Time: a few passes over the values (the first over all N, later ones over the values
    in candidate bins) plus O(S log S) for S listed positions, summed over cuts: every bin
    (at most 2^16, usually a few thousand) for each cut in the first round, a few per cut
    in the last. vgg16's 15M weights at k = 16 take about 0.3 s on one core. Large k costs
    about k x bins in the first round (seconds at k = 256); a k whose first-round lists
    would pass `_MAX_LISTED` is refused (use Lloyd's k-means). Memory: O(N) for the values
    gathered and O(S), never a k x N table. The first call compiles (numba, a few seconds;
    cached on disk afterwards).
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    x = _as_flat_array(values)
    if x.size == 0:
        raise ConfigError("kmeans1d needs at least one value, got an empty array")
    float32 = x.dtype == np.float32
    align = 32 if float32 else 0
    bits = x.view(np.uint32 if float32 else np.uint64)
    no_parent = np.empty(0, np.int32)
    stats, bad = histogram(x, bits, align, no_parent, 0, _FIRST_BITS, 1 << _FIRST_BITS)
    if bad >= 0:
        raise ConfigError(f"values must be finite; values[{bad}] is {x[bad]}")
    if k >= x.size:
        return _distinct_padded(x, k)
    atoms = _atoms_from_histogram(stats)
    if k == 1:
        return torch.from_numpy(atoms.means(np.zeros(1, np.int64)))
    shift = float(atoms.means(np.zeros(1, np.int64))[0])
    listed = (k - 1) * (atoms.count.size + 1 + int((atoms.high > atoms.low).sum()))
    if listed > _MAX_LISTED:
        raise KMeansTooLarge(
            f"k={k} is too large for exact k-means on these {x.size} values: the first "
            f"round would list {listed} > {_MAX_LISTED} (k x bins) positions; use a "
            f"smaller k or Lloyd's k-means (init 'kmeans-lloyd')")
    states, offsets = _all_states(atoms, k)
    source, parent, level, nb = x, no_parent, 0, _FIRST_BITS
    while (states % 2 == 1).any():
        states, offsets = _prune(atoms, shift, states, offsets)
        inside = states[states % 2 == 1] // 2
        if inside.size == 0:
            break
        refined = np.zeros(atoms.count.size, dtype=bool)
        refined[inside] = True
        n_refined = int(refined.sum())
        assert (atoms.slot[refined] >= 0).all(), "a frozen atom was chosen for refinement"
        # gather the values of the refined atoms and bin them by their next key bits
        table = np.full(stats.shape[0], -1, np.int64)
        table[atoms.slot[refined]] = np.arange(n_refined)
        gathered = int(atoms.count[refined].sum())
        source, parent = gather(source, bits, align, parent, level, nb, table, gathered)
        bits = source.view(np.uint32 if float32 else np.uint64)
        level += nb
        # Few slots per value gathered (their table is zeroed and scanned, and should stay
        # in cache), and short lists: a listed state inside an atom becomes up to
        # 2^(nb + 1) states.
        slots = min(_MAX_BINS, 4 * gathered)
        nb = min(64 - level, np.log2(slots / n_refined), np.log2(_MAX_GROWTH / inside.size))
        nb = int(max(1, nb))
        assert level + nb <= 64, f"refining past the last key bit ({level} + {nb})"
        stats = histogram(source, bits, align, parent, level, nb, n_refined << nb)[0]
        sub = _atoms_from_histogram(stats)
        atoms, first = _split(atoms, refined, sub, nb)
        states, offsets = next_states(states, offsets, first, atoms.high > atoms.low)
    # no listed cut lies inside an atom: the best clustering with nonempty clusters is exact
    exact = _prefixes(atoms, shift, relaxed=False)[:3]
    best, argmin = min_plus(states, offsets, *exact, True, True)
    if not np.isfinite(best[-1]):  # no k nonempty clusters: fewer than k distinct values
        return _distinct_padded(x, k)
    cuts = [states.size - 1]
    for _ in range(k):
        cuts.append(argmin[cuts[-1]])
    return torch.from_numpy(atoms.means(states[cuts[::-1][:-1]] // 2))  # from first atoms
