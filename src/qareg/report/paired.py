"""Paired comparisons by seed: a method's accuracy minus another's on the same seeds (the
same pretrained network, data order and initialisation), with a 95% t-interval. Pairing
removes the seed-to-seed spread that unpaired means carry, so a few seeds can separate
methods whose means differ by less than one standard deviation."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from scipy import stats

from qareg.report.results import is_reference, setting

CONFIDENCE = 0.95


def accuracies_by_seed(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, dict[int, float]]:
    """(model, dataset, method, bits) -> {seed: accuracy}."""
    out: dict[tuple, dict[int, float]] = defaultdict(dict)
    for row in rows:
        out[(*setting(row), row["method"], row["bits"])][row["seed"]] = row["accuracy"]
    return out


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, Any] | None:
    """Mean of a[seed] - b[seed] over the seeds both have, with its 95% t-interval (None
    bounds with one seed); None when they share no seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    differences = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(differences)
    if len(seeds) < 2:
        return {"n": 1, "seeds": seeds, "mean": mean, "low": None, "high": None}
    half = (stats.t.ppf(0.5 + CONFIDENCE / 2, len(seeds) - 1)
            * statistics.stdev(differences) / math.sqrt(len(seeds)))
    return {"n": len(seeds), "seeds": seeds, "mean": mean, "low": mean - half,
            "high": mean + half}


def family(method: str) -> str:
    """The method a name belongs to: `qareg-reg` and `qareg-ste` are parts of `qareg`."""
    return method.split("-")[0] if method.startswith("qareg") else method


ABLATIONS = ("reg", "ste")  # name parts that mark a qareg configuration as an ablation


def is_ablation(method: str) -> bool:
    """`qareg-ste`, `qareg-reg`, `qareg-ste-size`...: qareg with one of its parts removed."""
    return family(method) == "qareg" and any(p in ABLATIONS for p in method.split("-")[1:])


def paired_table(rows: Iterable[Mapping[str, Any]], subject: str | None = None
                 ) -> list[dict[str, Any]]:
    """Per model, dataset and bit-width where a subject ran: its paired difference against
    the best rival (the other family's method with the highest mean accuracy at that width)
    and against every other configuration of its family there (role "part" for an ablation
    such as `qareg-ste`, "variant" otherwise). Subjects: `subject`, or by default every
    qareg configuration that is not an ablation (`qareg`, `qareg-size`...). Ordered by
    model, dataset, bits, subject."""
    rows = [r for r in rows if not is_reference(r)]
    accuracies = accuracies_by_seed(rows)
    subjects = ({subject} if subject is not None else
                {m for (_, _, m, _) in accuracies if family(m) == "qareg" and not is_ablation(m)})
    out = []
    for (model, dataset, method, bits), ours in sorted(accuracies.items(),
                                                         key=lambda kv: (kv[0][0], kv[0][1],
                                                                         kv[0][3], kv[0][2])):
        if method not in subjects:
            continue
        here = {m: acc for (mo, d, m, b), acc in accuracies.items()
                if (mo, d, b) == (model, dataset, bits) and m != method}
        rivals = {m: acc for m, acc in here.items() if family(m) != family(method)}
        versus = []
        if rivals:
            versus.append((max(rivals, key=lambda m: statistics.fmean(rivals[m].values())),
                           "best rival"))
        versus += [(m, "part" if is_ablation(m) else "variant")
                   for m in sorted(here) if m not in rivals]
        for other, role in versus:
            difference = paired_difference(ours, here[other])
            if difference is not None:
                out.append({"model": model, "dataset": dataset, "bits": bits,
                            "method": method, "versus": other, "role": role, **difference})
    return out


def paired_markdown(entries: Iterable[Mapping[str, Any]]) -> str:
    """The paired table as markdown (one line per comparison)."""
    lines = ["| bits | comparison | versus | mean difference (points) | 95% interval | seeds |",
             "|--:|:--|:--|--:|:--|--:|"]
    for e in entries:
        interval = "-" if e["low"] is None else f"[{e['low']:+.2f}, {e['high']:+.2f}]"
        lines.append(f"| {e['bits']} | {e['method']} − {e['versus']} | {e['role']} "
                     f"| {e['mean']:+.2f} | {interval} | {e['n']} |")
    return "\n".join(lines) + "\n"
