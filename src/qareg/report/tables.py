"""The markdown table of `qareg report`, from the summary of result rows."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any


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
            "| method | bits | bits/weight | stored bits/weight | accuracy % | drop | n | file KB "
            "| train s | peak MB |",
            "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for s in group:
            std = _fmt(s["accuracy_std"], ".2f") if s["n"] > 1 else "-"
            lines.append(
                f"| {s['method']} | {s['bits']} | {s['bits_per_weight']:.2f} "
                f"| {_fmt(s['stored_bits_per_weight'], '.2f')} | {s['accuracy_mean']:.2f} ± {std} "
                f"| {_fmt(s['drop'], '.2f')} | {s['n']} "
                f"| {_fmt(s['file_bytes'], '.1f', 1e3)} | {_fmt(s['train_seconds'], '.1f')} "
                f"| {_fmt(s['peak_memory_bytes'], '.1f', 1e6)} |"
            )
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


# ----------------------------------------------------------------------------- plots
