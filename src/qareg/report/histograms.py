"""The "histograms" value of a bench result row: weights before and after training, and
the representatives, as JSON-friendly counts (the bench calls this on live tensors; the
report only reads the counts back)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from qareg.errors import QaregWarning
from qareg.validate import check_int


def histogram_record(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor],
                     grids: Mapping[str, Any], bins: int = 80) -> dict[str, dict[str, list]]:
    """The JSON-friendly "histograms" value of a result row: per tensor name, `bins` counts
    of the weights before and after training over shared edges spanning both, and the
    representatives (`grids[name]`; empty where `grids` has no entry, as for fp)."""
    check_int("bins", bins, 1)
    assert set(before) == set(after), f"before/after name mismatch: {set(before) ^ set(after)}"
    assert set(grids) <= set(before), f"grids for unknown tensors: {set(grids) - set(before)}"
    record = {}
    for name in before:
        values = []
        for tensor in (before[name], after[name]):
            v = tensor.detach().float().cpu().numpy().ravel()  # (numel,)
            finite = np.isfinite(v)
            if not finite.all():
                warnings.warn(f"histogram of {name!r}: {int((~finite).sum())} non-finite "
                              "weights left out of the counts", QaregWarning, stacklevel=2)
            values.append(v[finite])
        both = np.concatenate(values)
        low, high = (float(both.min()), float(both.max())) if both.size else (-1.0, 1.0)
        if low == high:  # a constant tensor: give its one value a bin of width 1
            low, high = low - 0.5, high + 0.5
        edges = np.linspace(low, high, bins + 1)  # (bins + 1,)
        before_counts, after_counts = (np.histogram(v, bins=edges)[0] for v in values)
        grid = grids.get(name)
        reps = [] if grid is None else torch.as_tensor(grid).detach().float().cpu().ravel()
        record[name] = {
            "edges": [float(e) for e in edges],
            "before": [int(c) for c in before_counts],
            "after": [int(c) for c in after_counts],
            "representatives": sorted(float(r) for r in reps),
        }
    return record
