"""Result rows of `qareg bench`: loading and checking JSON-lines files, and the summary
over seeds that tables and plots are built from.

Nothing here touches a live model: every number comes from a result row. Duplicate runs
(same model, dataset, method, bits and seed, e.g. one file given twice, or a run appended
again to a file) keep the later row and warn, naming both places: files are appended to, so
the later row is the newer run.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qareg.errors import ConfigError, QaregWarning

REFERENCE_BITS = 32  # the "bits" of the full-precision reference row (qareg.bench.FP_BITS)
REQUIRED = ("method", "bits", "seed", "accuracy", "bits_per_weight")
# null when unknown (rows of older benches have no stored_bits_per_weight)
OPTIONAL_NUMBERS = ("file_bytes", "stored_bits_per_weight", "train_seconds", "peak_memory_bytes")
OPTIONAL_TEXTS = ("model", "dataset", "git_commit")
UNKNOWN = "unknown"  # shown for a missing model, dataset or commit


def is_reference(row: Mapping[str, Any]) -> bool:
    """Whether `row` is a full-precision reference row."""
    return row["bits"] == REFERENCE_BITS


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _row_problem(row: Any) -> str | None:
    """What is wrong with one parsed result row, or None."""
    if not isinstance(row, dict):
        return f"a result row must be a JSON object, got {type(row).__name__}"
    missing = [key for key in REQUIRED if key not in row]
    if missing:
        return f"missing {', '.join(missing)} (every row needs {', '.join(REQUIRED)})"
    if not isinstance(row["method"], str) or not row["method"]:
        return f"method must be a non-empty string, got {row['method']!r}"
    if not _is_number(row["bits"]) or row["bits"] <= 0:
        return f"bits must be a number > 0 (a bit-width or a budget), got {row['bits']!r}"
    if not _is_int(row["seed"]) or row["seed"] < 0:
        return f"seed must be an integer >= 0, got {row['seed']!r}"
    if not _is_number(row["accuracy"]) or not 0 <= row["accuracy"] <= 100:
        return f"accuracy must be a percentage from 0 to 100, got {row['accuracy']!r}"
    if not _is_number(row["bits_per_weight"]) or row["bits_per_weight"] <= 0:
        return f"bits_per_weight must be a number > 0, got {row['bits_per_weight']!r}"
    for key in OPTIONAL_NUMBERS:
        value = row.get(key)
        if value is not None and (not _is_number(value) or value < 0):
            return f"{key} must be a number >= 0 or null, got {value!r}"
    for key in OPTIONAL_TEXTS:
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            return f"{key} must be a string or null, got {value!r}"
    return _histograms_problem(row.get("histograms"))


def _histograms_problem(histograms: Any) -> str | None:
    if histograms is None:
        return None
    if not isinstance(histograms, dict):
        return f"histograms must be an object or null, got {type(histograms).__name__}"
    for name, h in histograms.items():
        if not isinstance(h, dict) or not {"edges", "before", "after"} <= set(h):
            return f"histograms[{name!r}] needs edges, before and after"
        edges, before, after = h["edges"], h["before"], h["after"]
        if not all(isinstance(v, list) for v in (edges, before, after)):
            return f"histograms[{name!r}]: edges, before and after must be lists"
        if len(edges) < 2 or len(before) != len(edges) - 1 or len(after) != len(edges) - 1:
            return (f"histograms[{name!r}]: needs len(before) == len(after) == len(edges) - 1 "
                    f">= 1, got {len(edges)} edges, {len(before)} before, {len(after)} after")
        if not all(_is_number(v) for v in edges + before + after + h.get("representatives", [])):
            return f"histograms[{name!r}]: every edge, count and representative must be a number"
    return None


def _run_key(row: Mapping[str, Any]) -> tuple:
    return (*setting(row), row["method"], row["bits"], row["seed"])


def setting(row: Mapping[str, Any]) -> tuple[str, str]:
    """(model, dataset) of a row, "unknown" where the row does not say."""
    return row.get("model") or UNKNOWN, row.get("dataset") or UNKNOWN


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every run in the JSON-lines files `paths`, in file order, duplicates dropped (see the
    module docstring). Raises ConfigError naming the file and line of anything unreadable."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConfigError("results: give at least one JSON-lines file written by `qareg bench`")
    kept: dict[tuple, tuple[dict[str, Any], str]] = {}  # run key -> (row, "'file', line n")
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"results file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"results file {str(path)!r} is not a readable text file: "
                              f"{error}") from None
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{str(path)!r}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{where} is not JSON ({error.msg}); each line must be one "
                                  "result object") from None
            problem = _row_problem(row)
            if problem is not None:
                raise ConfigError(f"{where}: {problem}")
            key = _run_key(row)
            if key in kept:
                same = "identical" if kept[key][0] == row else "different"
                run = f"{key[2]} bits={key[3]} seed={key[4]} of {key[0]} on {key[1]}"
                warnings.warn(f"{where} repeats the run ({run}) of {kept[key][1]}, with {same} "
                              "values; keeping the later row", QaregWarning, stacklevel=2)
                del kept[key]  # re-insert: the kept row sits where its newest copy was
            kept[key] = (row, where)
    return [row for row, _ in kept.values()]


# ----------------------------------------------------------------------------- summary


def _mean_or_none(values: Iterable[Any]) -> float | None:
    """Mean of the non-null values; None if every one is null."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def method_order(row: Mapping[str, Any]) -> tuple[bool, str]:
    """The reference first, then methods alphabetically: stable across inputs."""
    return not is_reference(row), row["method"]


def summary(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, dataset, method, bits): n seeds, accuracy mean and sample std (0
    with one seed), means of bits/weight, file bytes, training seconds and peak memory, and
    the drop (reference mean of the same model/dataset minus this mean; None without a
    reference row). Ordered by model, dataset, then the reference first, the methods
    alphabetically, bits ascending."""
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    fp_accuracies: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        groups[(*setting(row), row["method"], row["bits"])].append(row)
        if is_reference(row):
            fp_accuracies[setting(row)].append(row["accuracy"])
    out = []
    for (model, dataset, method, bits), group in groups.items():
        accuracies = [r["accuracy"] for r in group]
        mean = statistics.fmean(accuracies)
        fp = fp_accuracies.get((model, dataset))
        out.append({
            "model": model,
            "dataset": dataset,
            "method": method,
            "bits": bits,
            "n": len(group),
            "seeds": sorted(r["seed"] for r in group),
            "accuracy_mean": mean,  # percent
            "accuracy_std": statistics.stdev(accuracies) if len(group) > 1 else 0.0,
            "bits_per_weight": statistics.fmean(r["bits_per_weight"] for r in group),
            "drop": statistics.fmean(fp) - mean if fp else None,  # percentage points
            **{key: _mean_or_none(r.get(key) for r in group) for key in OPTIONAL_NUMBERS},
            "commits": sorted({r.get("git_commit") or UNKNOWN for r in group}),
            "reference": is_reference(group[0]),
        })
    out.sort(key=lambda s: (s["model"], s["dataset"], method_order(s), s["bits"]))
    return out



def pareto_frontier(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (size, accuracy) points no other point beats, by size ascending: each is more
    accurate than every point at most its size."""
    frontier: list[tuple[float, float]] = []
    for size, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not frontier or accuracy > frontier[-1][1]:
            frontier.append((size, accuracy))
    return frontier
