"""Markdown table of a variant sweep, from its JSON-lines file only.

    python benchmarks/summarize_variants.py benchmarks/results/variants-cnn4.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(rows: list[dict]) -> str:
    fp = next(r for r in rows if r["variant"] == "full-precision")
    lines = [
        f"full precision: val {fp['val']:.2f}, test {fp['test']:.2f} "
        f"(model {fp['model']}, seed {fp['seed']}, commit {fp['git_commit'][:12]})",
        "",
        "| k | variant | val (snapped) | val drop | test (snapped) | test drop | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    runs = [r for r in rows if r["variant"] != "full-precision"]
    runs.sort(key=lambda r: (r["k"], r["variant"] != "ptq-kmeans", -r["val_quantized"]))
    for r in runs:
        seconds = r.get("train_seconds", "")
        lines.append(
            f"| {r['k']} | {r['variant']} | {r['val_quantized']:.2f} | "
            f"{fp['val'] - r['val_quantized']:.2f} | {r['test']:.2f} | "
            f"{fp['test'] - r['test']:.2f} | {seconds} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    print(table(rows))


if __name__ == "__main__":
    main()
