"""Does some configuration of one family beat each rival on the accuracy-per-byte plane?

For every rival (method, bits) of a setting: among the subject family's (method, bits)
groups whose mean file is no larger, the one with the highest mean accuracy, and whether it
is no less accurate: issue 17's frontier criterion, on means over seeds. Given the rows, each
pair also gets the paired difference by seed (`qareg.report.paired`), which says whether a
"no" by a tenth of a point is more than seed-to-seed noise."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from qareg.report.paired import accuracies_by_seed, family, paired_difference


def dominance_table(groups: Iterable[Mapping[str, Any]], subject: str = "qareg",
                    rows: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Per model, dataset and rival group (from `summary`, with file bytes): the best of
    `subject`'s family at no more bytes, or None, and whether it dominates; with `rows`
    (the runs behind the groups), "paired": the best's accuracy minus the rival's by seed
    (`paired_difference`, None without shared seeds)."""
    groups = [g for g in groups if not g["reference"] and g.get("file_bytes") is not None]
    by_seed = accuracies_by_seed(rows)
    out = []
    for rival in groups:
        if family(rival["method"]) == family(subject):
            continue
        ours = [g for g in groups if family(g["method"]) == family(subject)
                and (g["model"], g["dataset"]) == (rival["model"], rival["dataset"])
                and g["file_bytes"] <= rival["file_bytes"]]
        best = max(ours, key=lambda g: g["accuracy_mean"], default=None)
        paired = None
        if best is not None:
            paired = paired_difference(*(by_seed.get((g["model"], g["dataset"], g["method"],
                                                      g["bits"]), {}) for g in (best, rival)))
        out.append({"model": rival["model"], "dataset": rival["dataset"], "rival": rival,
                    "best": best, "paired": paired,
                    "dominated": best is not None
                    and best["accuracy_mean"] >= rival["accuracy_mean"]})
    return out


def dominance_markdown(entries: Iterable[Mapping[str, Any]]) -> str:
    """The table as markdown, one line per rival."""
    lines = ["| rival | bits | KB | accuracy % | best qareg at no more bytes | KB | accuracy % "
             "| dominated | paired difference [95% interval] |",
             "|:--|--:|--:|--:|:--|--:|--:|:--|:--|"]
    for e in entries:
        r, b, d = e["rival"], e["best"], e.get("paired")
        paired = "-" if d is None else f"{d['mean']:+.2f}" + (
            "" if d["low"] is None else f" [{d['low']:+.2f}, {d['high']:+.2f}]")
        ours = ("none | - | -" if b is None else
                f"{b['method']} at {b['bits']} | {b['file_bytes'] / 1e3:.1f} | "
                f"{b['accuracy_mean']:.2f}")
        verdict = "yes" if e["dominated"] else "no"
        lines.append(f"| {r['method']} | {r['bits']} | {r['file_bytes'] / 1e3:.1f} | "
                     f"{r['accuracy_mean']:.2f} | {ours} | {verdict} | {paired} |")
    return "\n".join(lines) + "\n"
