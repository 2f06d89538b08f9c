"""The plots of `qareg report`, drawn from result rows only (matplotlib's object API: no
pyplot, no global state, no GUI backend)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qareg.errors import ConfigError
from qareg.report.results import UNKNOWN, pareto_frontier, setting, summary
from qareg.version import __version__

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path, commits: Iterable[str]) -> Path:
    """Save `fig` as a PNG that records, in its text chunks, the commits of its data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120, metadata={
        "Software": f"qareg {__version__} (qareg report)",
        "Source": "result rows from commits " + ", ".join(sorted(set(commits))),
    })
    return path


def _canvas(groups: list[dict[str, Any]], plot: str, what: str
            ) -> tuple[tuple[str, str], Figure, Any]:
    """((model, dataset), figure, axes) for a plot of the summary `groups`, which must be of
    exactly one model/dataset. matplotlib's object API: no pyplot, no global state."""
    from matplotlib.figure import Figure

    settings = sorted({(s["model"], s["dataset"]) for s in groups})
    if len(settings) != 1:
        raise ConfigError(f"{plot} needs {what} of exactly one model/dataset, got "
                          f"{settings or 'none'}; plot each one apart")
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    return settings[0], fig, fig.add_subplot()


def _style(i: int) -> dict[str, str]:
    """The color and marker of the i-th method, the same in every plot."""
    return {"color": f"C{i % 10}", "marker": "osD^vP*Xh<>"[i % 11]}


def plot_accuracy_vs_bits(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Test accuracy (mean, sample-std error bars) against bits/weight on a log2 axis, one
    line per method, fp as a dashed horizontal line; `rows` are result rows of one
    model/dataset. Saves a PNG at `path` and returns it."""
    groups = summary(rows)
    (model, dataset), fig, ax = _canvas(groups, "plot_accuracy_vs_bits", "rows")
    quantized = [s for s in groups if not s["reference"]]
    for i, method in enumerate(sorted({s["method"] for s in quantized})):
        line = sorted((s for s in quantized if s["method"] == method), key=lambda s: s["bits"])
        ax.errorbar([s["bits_per_weight"] for s in line], [s["accuracy_mean"] for s in line],
                    yerr=[s["accuracy_std"] for s in line], label=method, capsize=3,
                    linewidth=1.5, **_style(i))
    for s in (s for s in groups if s["reference"]):
        ax.axhline(s["accuracy_mean"], color="0.3", linestyle="--", linewidth=1.2,
                   label=f"{s['method']} ({s['bits_per_weight']:g} bits/weight)")
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


def plot_accuracy_vs_size(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Test accuracy (mean over seeds) against the compressed file's bytes (mean, log axis):
    every (method, bits) as a marker, each method's Pareto frontier as its line, the
    full-precision reference as a dashed line; `rows` are result rows of one model/dataset
    (rows without file sizes are left out). Saves a PNG at `path` and returns it."""
    from matplotlib.ticker import FuncFormatter

    groups = [s for s in summary(rows) if s["file_bytes"] is not None]
    (model, dataset), fig, ax = _canvas(groups, "plot_accuracy_vs_size", "rows with file sizes")
    quantized = [s for s in groups if not s["reference"]]
    for i, method in enumerate(sorted({s["method"] for s in quantized})):
        mine = [s for s in quantized if s["method"] == method]
        ax.scatter([s["file_bytes"] / 1e3 for s in mine], [s["accuracy_mean"] for s in mine],
                   s=22, alpha=0.6, **_style(i))
        frontier = pareto_frontier((s["file_bytes"] / 1e3, s["accuracy_mean"]) for s in mine)
        ax.plot(*zip(*frontier, strict=True), label=method, linewidth=1.5, **_style(i))
    for s in (s for s in groups if s["reference"]):
        ax.axhline(s["accuracy_mean"], color="0.3", linestyle="--", linewidth=1.2,
                   label=f"{s['method']} ({s['file_bytes'] / 1e3:.0f} KB)")
    ax.set_xscale("log")
    plain = FuncFormatter(lambda x, _: f"{x:g}")  # 12 rather than 1.2 x 10^1
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("compressed file size (KB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model} on {dataset}: accuracy vs stored bytes\n"
                 "(lines: each method's Pareto frontier)", fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
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
    model, dataset = setting(row)
    fig.suptitle(f"{row.get('method')} {row.get('bits')}-bit, seed {row.get('seed')}: "
                 f"{model} on {dataset}")
    return _save(fig, path, [row.get("git_commit") or UNKNOWN])
