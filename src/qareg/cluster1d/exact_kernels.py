"""Compiled (numba, single-threaded) passes of the exact 1-D k-means (`qareg.cluster1d.exact`):
histograms of values binned by their IEEE sort key, gathering the values of refined bins,
compensated prefix sums, and the min-plus programme over listed cut positions.
"""

import numpy as np
from numba import njit

SIGN_BIT = np.uint64(1 << 63)


@njit(inline="always")
def _sort_key(bits, align):
    """An unsigned key in the order of the float with these bits (-0 keyed as +0): flip all
    bits of a negative number, only the sign bit of a positive one. No branch on the sign."""
    b = np.uint64(bits) << np.uint64(align)  # float32 bits go to the top of 64
    if b == SIGN_BIT:
        b = np.uint64(0)
    return b ^ (np.uint64(np.int64(b) >> 63) | SIGN_BIT)


@njit(inline="always")
def _slot(bits, align, parent, i, shift, mask, nb):
    """Histogram slot of value i: its parent atom's rank (if any), then `nb` more key bits."""
    b = np.int64((_sort_key(bits[i], align) >> shift) & mask)
    if parent.size > 0:
        b += np.int64(parent[i]) << nb
    return b


@njit(cache=True)
def histogram(x, bits, align, parent, level, nb, nslots):
    """(nslots, 8) count, sum and sum of squares about the slot's first value, first value,
    min, max (2 unused); and the index of the first non-finite value (-1 if none). One
    64-byte row per slot: one cache line per value."""
    stats = np.zeros((nslots, 8))
    shift, mask = np.uint64(64 - level - nb), np.uint64((1 << nb) - 1)
    for i in range(x.size):
        v = np.float64(x[i])
        if not np.isfinite(v):
            return stats, i
        b = _slot(bits, align, parent, i, shift, mask, nb)
        if stats[b, 0] == 0.0:
            stats[b, 3], stats[b, 4], stats[b, 5] = v, v, v
        stats[b, 0] += 1.0
        d = v - stats[b, 3]
        stats[b, 1] += d
        stats[b, 2] += d * d
        if v < stats[b, 4]:  # rarely taken: well predicted
            stats[b, 4] = v
        if v > stats[b, 5]:
            stats[b, 5] = v
    return stats, -1


@njit(cache=True)
def gather(x, bits, align, parent, level, nb, table, size):
    """The `size` values whose slot maps to a refined atom, and that atom's rank in `table`."""
    out, out_parent = np.empty(size + 1, x.dtype), np.empty(size + 1, np.int32)
    shift, mask = np.uint64(64 - level - nb), np.uint64((1 << nb) - 1)
    j = 0
    for i in range(x.size):  # writes every value, keeps the wanted ones: no branch
        t = table[_slot(bits, align, parent, i, shift, mask, nb)]
        out[j], out_parent[j] = x[i], t
        j += t >= 0
    return out[:size], out_parent[:size]


@njit(cache=True)
def prefix_sums(items):
    """(rows, T) -> (rows, T + 1) compensated (Neumaier) prefix sums, each within a few
    rounding errors of its exact value whatever T is."""
    out = np.zeros((items.shape[0], items.shape[1] + 1))
    for r in range(items.shape[0]):
        total, compensation = 0.0, 0.0
        for i in range(items.shape[1]):
            x = items[r, i]
            t = total + x
            if abs(total) >= abs(x):
                compensation += (total - t) + x
            else:
                compensation += (x - t) + total
            total = t
            out[r, i + 1] = total + compensation
    return out


@njit(inline="always")
def _cost(count, sums, squares, a, b):
    """Sum of squares about their mean of the items between states a <= b (0 if none)."""
    n = count[b] - count[a]
    if n <= 0.0:
        return 0.0
    s = sums[b] - sums[a]
    c = squares[b] - squares[a] - s * s / n
    return c if c > 0.0 else 0.0


@njit(cache=True)
def min_plus(states, offsets, count, sums, squares, strict, with_argmin):
    """best[i] = min over j in the previous list, states[j] < states[i] (<= unless strict), of
    best[j] + cost(states[j], states[i]); list m is states[offsets[m]:offsets[m + 1]], sorted,
    and list 0 is state 0 at cost 0. Also the minimising j (global index) if `with_argmin`.

    The costs are Monge, so the minimising j never decreases along a list: each list is
    solved by divide and conquer on its middle entry, O((rows + columns) log rows).
    """
    best = np.full(states.size, np.inf)
    argmin = np.full(states.size if with_argmin else 0, -1, np.int64)
    best[offsets[0]] = 0.0
    stack = np.empty((130, 4), np.int64)  # depth <= log2(rows) + 2
    for m in range(1, offsets.size - 1):
        r0, r1, c0, c1 = offsets[m], offsets[m + 1], offsets[m - 1], offsets[m]
        if r0 == r1 or c0 == c1:
            continue
        last = np.empty(r1 - r0, np.int64)  # last admissible column of each row
        j = c0 - 1
        for r in range(r0, r1):
            while j + 1 < c1 and (states[j + 1] < states[r]
                                  or (not strict and states[j + 1] == states[r])):
                j += 1
            last[r - r0] = j
        stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = r0, r1 - 1, c0, c1 - 1
        top = 1
        while top > 0:
            top -= 1
            lo, hi, clo, chi = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
            mid = (lo + hi) // 2
            s = states[mid]
            value, at = np.inf, clo
            for j in range(clo, min(chi, last[mid - r0]) + 1):
                if best[j] < value:
                    v = best[j] + _cost(count, sums, squares, states[j], s)
                    if v < value:
                        value, at = v, j
            best[mid] = value
            if with_argmin:
                argmin[mid] = at
            if lo < mid:
                stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = lo, mid - 1, clo, at
                top += 1
            if mid < hi:
                stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = mid + 1, hi, at, chi
                top += 1
    return best, argmin


@njit(cache=True)
def next_states(states, offsets, first, splittable):
    """Carry each list of kept states to the refined atoms: a boundary before old atom a
    becomes the boundary before new atom first[a]; "inside old atom a" becomes every
    boundary and interior among its sub-atoms first[a] .. first[a + 1] - 1."""
    total = 0
    for s in states:
        if s % 2 == 0:
            total += 1
        else:
            for j in range(first[s // 2], first[s // 2 + 1]):
                total += (j > first[s // 2]) + splittable[j]
    out, out_offsets = np.empty(total, np.int64), np.zeros_like(offsets)
    n = 0
    for m in range(offsets.size - 1):
        for s in states[offsets[m]:offsets[m + 1]]:
            a = s // 2
            if s % 2 == 0:
                out[n] = 2 * first[a]
                n += 1
                continue
            for j in range(first[a], first[a + 1]):
                if j > first[a]:
                    out[n] = 2 * j
                    n += 1
                if splittable[j]:
                    out[n] = 2 * j + 1
                    n += 1
        out_offsets[m + 1] = n
    return out, out_offsets
