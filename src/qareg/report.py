"""`qareg report`: tables and plots built only from the JSON-lines result files of `qareg bench`.

Nothing here touches a live model: every number comes from a result row. The one exception,
`histogram_record`, is the helper the bench calls to turn weights into the JSON-friendly
"histograms" value of its rows.

Duplicate runs (same model, dataset, method, bits and seed, e.g. one file given twice, or a
run appended again to a file) keep the later row and warn, naming both places: files are
appended to, so the later row is the newer run.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qareg.config import check_int
from qareg.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FP_METHOD = "fp"  # the full-precision reference row's method name
REQUIRED = ("method", "bits", "seed", "accuracy", "bits_per_weight")
OPTIONAL_NUMBERS = ("file_bytes", "train_seconds", "peak_memory_bytes")  # null when unknown
OPTIONAL_TEXTS = ("model", "dataset", "git_commit")
UNKNOWN = "unknown"  # shown for a missing model, dataset or commit


# ----------------------------------------------------------------------------- loading


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
    for key in ("bits", "seed"):
        if not _is_int(row[key]) or row[key] < (1 if key == "bits" else 0):
            low = 1 if key == "bits" else 0
            return f"{key} must be an integer >= {low}, got {row[key]!r}"
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
    return (*_setting(row), row["method"], row["bits"], row["seed"])


def _setting(row: Mapping[str, Any]) -> tuple[str, str]:
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
                              "values; keeping the later row", stacklevel=2)
                del kept[key]  # re-insert: the kept row sits where its newest copy was
            kept[key] = (row, where)
    return [row for row, _ in kept.values()]


# ----------------------------------------------------------------------------- summary


def _mean_or_none(values: Iterable[Any]) -> float | None:
    """Mean of the non-null values; None if every one is null."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _method_order(method: str) -> tuple[bool, str]:
    return method != FP_METHOD, method  # fp first, then alphabetical: stable across inputs


def summary(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, dataset, method, bits): n seeds, accuracy mean and sample std (0
    with one seed), means of bits/weight, file bytes, training seconds and peak memory, and
    the drop (fp mean of the same model/dataset minus this mean; None without an fp row).
    Ordered by model, dataset, then fp first, methods alphabetically, bits ascending."""
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    fp_accuracies: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        groups[(*_setting(row), row["method"], row["bits"])].append(row)
        if row["method"] == FP_METHOD:
            fp_accuracies[_setting(row)].append(row["accuracy"])
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
        })
    out.sort(key=lambda s: (s["model"], s["dataset"], _method_order(s["method"]), s["bits"]))
    return out


# ----------------------------------------------------------------------------- table


def _short_commit(commit: str) -> str:
    dirty = commit.endswith("+dirty")
    base = commit.removesuffix("+dirty")
    return (base[:12] if re.fullmatch(r"[0-9a-f]{13,}", base) else base) + ("+dirty" * dirty)


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def markdown_table(summary_rows: Iterable[Mapping[str, Any]]) -> str:
    """The summary as markdown: per model/dataset, a header line naming them and the commits
    the rows came from, then one table line per method and bits (in the summary's order)."""
    by_setting: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for s in summary_rows:
        by_setting[(s["model"], s["dataset"])].append(s)
    sections = []
    for (model, dataset), group in by_setting.items():
        commits = sorted({c for s in group for c in s["commits"]})
        lines = [
            f"**{model} on {dataset}**, from commit{'s' * (len(commits) > 1)} "
            + ", ".join(f"`{_short_commit(c)}`" for c in commits),
            "",
            "| method | bits | bits/weight | accuracy % | drop | n | file KB | train s | peak MB |",
            "|:--|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for s in group:
            std = _fmt(s["accuracy_std"], ".2f") if s["n"] > 1 else "-"
            lines.append(
                f"| {s['method']} | {s['bits']} | {s['bits_per_weight']:.2f} "
                f"| {s['accuracy_mean']:.2f} ± {std} | {_fmt(s['drop'], '.2f')} | {s['n']} "
                f"| {_fmt(s['file_bytes'], '.1f', 1e3)} | {_fmt(s['train_seconds'], '.1f')} "
                f"| {_fmt(s['peak_memory_bytes'], '.1f', 1e6)} |"
            )
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


# ----------------------------------------------------------------------------- plots


def _save(fig: Figure, path: str | Path, commits: Iterable[str]) -> Path:
    """Save `fig` as a PNG that records, in its text chunks, the commits of its data."""
    from qareg import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120, metadata={
        "Software": f"qareg {__version__} (qareg report)",
        "Source": "result rows from commits " + ", ".join(sorted(set(commits))),
    })
    return path


def plot_accuracy_vs_bits(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Test accuracy (mean, sample-std error bars) against bits/weight on a log2 axis, one
    line per method, fp as a dashed horizontal line; `rows` are result rows of one
    model/dataset. Saves a PNG at `path` and returns it."""
    groups = summary(rows)
    settings = sorted({(s["model"], s["dataset"]) for s in groups})
    if len(settings) != 1:
        raise ConfigError("plot_accuracy_vs_bits needs the rows of exactly one model/dataset, "
                          f"got {settings or 'no rows'}; plot each one apart")
    (model, dataset), = settings
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    quantized = [s for s in groups if s["method"] != FP_METHOD]
    methods = sorted({s["method"] for s in quantized}, key=_method_order)
    colors = [f"C{i % 10}" for i in range(len(methods))]
    markers = "osD^vP*Xh<>"
    for i, method in enumerate(methods):
        line = sorted((s for s in quantized if s["method"] == method), key=lambda s: s["bits"])
        ax.errorbar([s["bits_per_weight"] for s in line], [s["accuracy_mean"] for s in line],
                    yerr=[s["accuracy_std"] for s in line], label=method, color=colors[i],
                    marker=markers[i % len(markers)], capsize=3, linewidth=1.5)
    for s in (s for s in groups if s["method"] == FP_METHOD):
        ax.axhline(s["accuracy_mean"], color="0.3", linestyle="--", linewidth=1.2,
                   label=f"{FP_METHOD} ({s['bits_per_weight']:g} bits/weight)")
        if s["accuracy_std"] > 0:
            ax.axhspan(s["accuracy_mean"] - s["accuracy_std"],
                       s["accuracy_mean"] + s["accuracy_std"], color="0.3", alpha=0.12)
    ax.set_xscale("log", base=2)
    bits = sorted({s["bits"] for s in quantized})
    if bits:
        ax.set_xticks(bits, [str(b) for b in bits])
        ax.set_xticks([], minor=True)
    ax.set_xlabel("bits per weight (log2 scale; ticks at the bit-widths)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model} on {dataset}: accuracy vs bits per weight")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path, (c for s in groups for c in s["commits"]))


def plot_histograms(row: Mapping[str, Any], path: str | Path) -> Path:
    """One subplot per layer of a result row: weight histograms before and after training
    (steps, log counts) and the representatives as vertical lines. Saves a PNG at `path`."""
    histograms = row.get("histograms")
    if not histograms:
        raise ConfigError(f"result row {row.get('method')!r} bits={row.get('bits')} "
                          f"seed={row.get('seed')} has no histograms to plot")
    names = list(histograms)
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        h = histograms[name]
        edges = np.asarray(h["edges"], dtype=float)  # (bins + 1,)
        for key, color in (("before", "C0"), ("after", "C1")):
            ax.stairs(np.asarray(h[key], dtype=float), edges, color=color, label=key,
                      linewidth=1.2, alpha=0.9)
        reps = h.get("representatives") or []
        for j, value in enumerate(reps):
            ax.axvline(value, color="C3", linewidth=0.7, alpha=0.6,
                       label=f"representatives ({len(reps)})" if j == 0 else None)
        ax.set_yscale("log", nonpositive="clip")  # empty bins drop to the bottom edge
        ax.set_ylim(bottom=0.7)
        ax.set_title(f"{name} ({int(sum(h['before']))} weights)", fontsize="small")
        ax.set_xlabel("weight value", fontsize="small")
        ax.set_ylabel("count", fontsize="small")
        ax.tick_params(labelsize="x-small")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="x-small")
    model, dataset = _setting(row)
    fig.suptitle(f"{row.get('method')} {row.get('bits')}-bit, seed {row.get('seed')}: "
                 f"{model} on {dataset}")
    return _save(fig, path, [row.get("git_commit") or UNKNOWN])


# ----------------------------------------------------------------------------- bench helper


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
                              "weights left out of the counts", stacklevel=2)
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


# ----------------------------------------------------------------------------- report


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", "_".join(str(p) for p in parts)).strip("_")


def _histogram_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Which rows get a histogram plot: per model/dataset and method, the row at the method's
    lowest bit-width (where quantization shows most) and lowest seed, if it has histograms."""
    chosen: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if not row.get("histograms"):
            continue
        key = (*_setting(row), row["method"])
        if key not in chosen or (row["bits"], row["seed"]) < (chosen[key]["bits"],
                                                               chosen[key]["seed"]):
            chosen[key] = row
    return sorted(chosen.values(), key=lambda r: (*_setting(r), _method_order(r["method"])))


def write_report(paths: Iterable[str | Path], out_dir: str | Path) -> list[Path]:
    """Load the result files `paths` and write into `out_dir`: report.md (tables, links to
    the plots), an accuracy-vs-bits PNG per model/dataset, and weight-histogram PNGs for one
    row per method (see `_histogram_rows`). Returns the written paths, report.md first."""
    paths = [Path(p) for p in paths]
    rows = load_results(paths)
    if not rows:
        raise ConfigError(f"results files {[str(p) for p in paths]} hold no result rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = summary(rows)
    settings = list(dict.fromkeys((s["model"], s["dataset"]) for s in groups))
    plots: list[Path] = []
    from qareg import __version__

    text = ["# qareg benchmark report", "",
            f"Built by qareg {__version__} from {len(rows)} runs in "
            + ", ".join(f"`{p}`" for p in paths) + ". Accuracy is test accuracy in percent, "
            "mean ± sample std over seeds; drop is the fp mean minus the mean "
            "(percentage points); KB = 1000 bytes.", ""]
    for model, dataset in settings:
        name = ("accuracy_vs_bits.png" if len(settings) == 1
                else f"accuracy_vs_bits_{_slug(model, dataset)}.png")
        setting_rows = [r for r in rows if _setting(r) == (model, dataset)]
        plots.append(plot_accuracy_vs_bits(setting_rows, out_dir / name))
        text += [f"## {model} on {dataset}", "",
                 markdown_table([s for s in groups if (s["model"], s["dataset"]) ==
                                 (model, dataset)]).rstrip("\n"),
                 "", f"![accuracy vs bits per weight]({name})", ""]
        chosen = _histogram_rows(setting_rows)
        if chosen:
            text += ["### Weight histograms (before and after training)", ""]
        for row in chosen:
            hist_name = (f"histograms_{_slug(model, dataset, row['method'])}"
                         f"_{row['bits']}bit_seed{row['seed']}.png")
            plots.append(plot_histograms(row, out_dir / hist_name))
            text += [f"{row['method']}, {row['bits']}-bit, seed {row['seed']}:", "",
                     f"![{row['method']} weight histograms]({hist_name})", ""]
        text.append("")
    report = out_dir / "report.md"
    report.write_text("\n".join(text).rstrip("\n") + "\n", encoding="utf-8")
    return [report, *plots]
