"""`qareg report`: tables and plots built only from the JSON-lines result files of
`qareg bench` (`results`: loading and the summary; `tables`, `plots`; `histograms`: the
helper the bench uses to record weight histograms in its rows)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qareg.errors import ConfigError
from qareg.report.dominance import dominance_markdown, dominance_table
from qareg.report.histograms import histogram_record
from qareg.report.paired import paired_markdown, paired_table
from qareg.report.plots import plot_accuracy_vs_bits, plot_accuracy_vs_size, plot_histograms
from qareg.report.results import load_results, method_order, pareto_frontier, setting, summary
from qareg.report.tables import markdown_table
from qareg.version import __version__

__all__ = ["dominance_markdown", "dominance_table", "histogram_record", "load_results",
           "markdown_table", "paired_markdown", "paired_table", "pareto_frontier",
           "plot_accuracy_vs_bits", "plot_accuracy_vs_size", "plot_histograms", "summary",
           "write_report"]


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", "_".join(str(p) for p in parts)).strip("_")


def _histogram_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Which rows get a histogram plot: per model/dataset and method, the row at the method's
    lowest bit-width (where quantization shows most) and lowest seed, if it has histograms."""
    chosen: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if not row.get("histograms"):
            continue
        key = (*setting(row), row["method"])
        if key not in chosen or (row["bits"], row["seed"]) < (chosen[key]["bits"],
                                                               chosen[key]["seed"]):
            chosen[key] = row
    return sorted(chosen.values(), key=lambda r: (*setting(r), method_order(r)))


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
    text = ["# qareg benchmark report", "",
            f"Built by qareg {__version__} from {len(rows)} runs in "
            + ", ".join(f"`{p}`" for p in paths) + ". Accuracy is test accuracy in percent, "
            "mean ± sample std over seeds; drop is the full-precision mean minus the mean "
            "(percentage points); KB = 1000 bytes.", ""]
    for model, dataset in settings:
        name = ("accuracy_vs_bits.png" if len(settings) == 1
                else f"accuracy_vs_bits_{_slug(model, dataset)}.png")
        setting_rows = [r for r in rows if setting(r) == (model, dataset)]
        plots.append(plot_accuracy_vs_bits(setting_rows, out_dir / name))
        size_name = name.replace("accuracy_vs_bits", "accuracy_vs_size")
        if any(r.get("file_bytes") is not None for r in setting_rows):
            plots.append(plot_accuracy_vs_size(setting_rows, out_dir / size_name))
        text += [f"## {model} on {dataset}", "",
                 markdown_table([s for s in groups if (s["model"], s["dataset"]) ==
                                 (model, dataset)]).rstrip("\n"),
                 "", f"![accuracy vs bits per weight]({name})", ""]
        if plots[-1].name == size_name:
            text += [f"![accuracy vs stored bytes]({size_name})", ""]
        here = [s for s in groups if (s["model"], s["dataset"]) == (model, dataset)]
        dominance = dominance_table(here, rows=setting_rows)
        if any(e["best"] is not None for e in dominance):
            text += ["### Each rival against the best qareg configuration at no more bytes", "",
                     "Means over seeds: the qareg family's (method, bits) with the highest "
                     "accuracy among those whose file is no larger than the rival's; beside it, "
                     "its test accuracy minus the rival's paired by seed.", "",
                     dominance_markdown(dominance).rstrip("\n"), ""]
        paired = paired_table(setting_rows)
        if paired:
            text += ["### qareg against the best rival and its own parts, paired by seed", "",
                     "Test accuracy of each qareg configuration (every one that is not an "
                     "ablation) minus the other method's on the same seeds; the best rival is "
                     "the other method with the highest mean at that width.", "",
                     paired_markdown(paired).rstrip("\n"), ""]
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
