"""Two `qareg bench` result files side by side: the test accuracy of every (method, bits,
seed) in both, the difference, and the difference in index-stream bytes, as a markdown
table. `--common` leaves out the rows that only one file has (a re-run of part of a suite).

    python benchmarks/compare_results.py benchmarks/results/refactor-before-seed0.jsonl \
        benchmarks/results/refactor-after-seed0.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qareg.report import load_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.3,
                        help="points of accuracy a row may move (default 0.3)")
    parser.add_argument("--common", action="store_true",
                        help="only the (method, bits, seed) rows both files have")
    args = parser.parse_args()
    rows = [{(r["method"], r["bits"], r["seed"]): r for r in load_results([path])}
            for path in (args.before, args.after)]
    keys = set(rows[0]) & set(rows[1]) if args.common else set(rows[0]) | set(rows[1])
    commits = [sorted({side[k]["git_commit"][:12] for k in keys if k in side}) for side in rows]
    print(f"| method | bits | seed | before ({', '.join(commits[0])}) "
          f"| after ({', '.join(commits[1])}) | difference | index bytes difference |")
    print("|:--|--:|--:|--:|--:|--:|--:|")
    worst = 0.0
    for key in sorted(keys, key=lambda k: (k[0] != "fp", k)):
        before, after = (side.get(key) for side in rows)
        if before is None or after is None:
            print(f"| {key[0]} | {key[1]} | {key[2]} | {'-' if before is None else ''} "
                  f"| {'-' if after is None else ''} | only in one file | |")
            continue
        diff = round(after["accuracy"] - before["accuracy"], 2)  # accuracies are in hundredths
        worst = max(worst, abs(diff))
        index = [side.get("index_bytes") for side in (before, after)]
        index_diff = "" if None in index else f"{index[1] - index[0]:+d}"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {before['accuracy']:.2f} "
              f"| {after['accuracy']:.2f} | {diff:+.2f} | {index_diff} |")
    verdict = "within" if worst <= args.tolerance else "NOT within"
    print(f"\nlargest difference {worst:.2f} points: {verdict} {args.tolerance}")


if __name__ == "__main__":
    main()
