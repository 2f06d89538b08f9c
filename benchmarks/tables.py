"""Every table of BENCHMARKS.md that `qareg report` does not draw, rebuilt from result files
only (markdown on stdout). One subcommand per kind of file:

    python benchmarks/tables.py demo benchmarks/results/demo.json
    python benchmarks/tables.py tuning benchmarks/results/suite-lenet5.jsonl
    python benchmarks/tables.py widths benchmarks/results/suite-cnn4.jsonl
    python benchmarks/tables.py sizes benchmarks/results/suite-lenet5.jsonl --seed 0
    python benchmarks/tables.py variants benchmarks/results/variants-cnn4.jsonl
    python benchmarks/tables.py size-explore benchmarks/results/size-explore-lenet5.jsonl
    python benchmarks/tables.py assignment benchmarks/results/assignment-cnn4.jsonl
    python benchmarks/tables.py defaults benchmarks/results/method-defaults-lenet5.jsonl
    python benchmarks/tables.py storage benchmarks/results/storage-vgg16.jsonl
    python benchmarks/tables.py kmeans1d benchmarks/results/kmeans1d-vgg16.jsonl
    python benchmarks/tables.py cost benchmarks/results/regularizer-cost-vgg16.jsonl --last 3
    python benchmarks/tables.py deploy benchmarks/results/deploy-lenet5-cnn4-vgg16.jsonl
    python benchmarks/tables.py penalty-pass benchmarks/results/penalty-pass-vgg16.jsonl
    python benchmarks/tables.py gradl1-widths benchmarks/results/gradl1-widths-lenet5.jsonl
    python benchmarks/tables.py cpq-widths benchmarks/results/cpq-widths-lenet5.jsonl

The suites' own tables, plots and paired intervals come from `qareg report FILE --out-dir
DIR`; two bench files side by side from `benchmarks/compare_results.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from summarize_variants import table as variants_table

from qareg.report.paired import paired_difference

Rows = list[dict[str, Any]]


def read_rows(path: Path) -> Rows:
    text = path.read_text()
    if path.suffix == ".json":
        return [json.loads(text)]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def short(commit: str) -> str:
    return commit.removesuffix("+dirty")[:7] + ("+dirty" if commit.endswith("+dirty") else "")


def demo(rows: Rows, args: argparse.Namespace) -> str:
    (result,) = rows
    fp = result["full_precision"]
    lines = [f"commit {short(result['git_commit'])}, wall time {result['seconds']:.0f} s, "
             f"config {result['config']}", "",
             "| method | k | bits/weight | test acc % | drop | file KB | ratio |",
             "|---|--:|--:|--:|--:|--:|--:|",
             f"| full precision | - | 32 | {fp['accuracy']:.2f} | | "
             f"{fp['file_bytes'] / 1e3:.1f} | 1.00 |"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['k']} | {r['bits_per_weight']:.2f} "
                     f"| {r['accuracy']:.2f} | {r['drop']:.2f} | {r['file_bytes'] / 1e3:.1f} "
                     f"| {r['compression_ratio']:.2f} |")
    return "\n".join(lines)


def tuning(rows: Rows, args: argparse.Namespace) -> str:
    """Each tuned (method, bits): the validation accuracy of every trial, the choice."""
    tuned = sorted((r for r in rows if (r.get("tuning") or {}).get("trials")),
                   key=lambda r: (r["method"], r["bits"]))
    if not tuned:
        return "no tuned rows"
    width = max(len(r["tuning"]["trials"]) for r in tuned)
    lines = ["| method | bits | " + " | ".join(f"trial {i + 1}" for i in range(width))
             + " | chosen |", "|:--|--:|" + "--:|" * width + ":--|"]
    for r in tuned:
        trials = r["tuning"]["trials"]
        cells = []
        for i, t in enumerate(trials):
            value = f"{statistics.fmean(t['val_accuracy']):.2f}"
            cells.append(f"**{value}**" if i == r["tuning"]["chosen"] else value)
        lines.append(f"| {r['method']} | {r['bits']} | " + " | ".join(cells)
                     + f" | {r['tuning']['choice'] or 'as configured'} |")
    spaces = {r["method"]: [json.dumps(t["choice"]) for t in r["tuning"]["trials"]]
              for r in tuned}
    lines += ["", "Trials in order: " + "; ".join(f"{m}: {', '.join(c)}"
                                                  for m, c in sorted(spaces.items()))]
    return "\n".join(lines)


def widths(rows: Rows, args: argparse.Namespace) -> str:
    """A suite condensed: one line per method, test accuracy (mean ± sample std over seeds)
    and mean file KB at each bit-width, methods by mean accuracy at the lowest width."""
    cells: dict[tuple[str, Any], list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] != "fp":
            cells[(r["method"], r["bits"])].append(r)
    bits = sorted({b for _, b in cells})
    methods = sorted({m for m, _ in cells},
                     key=lambda m: -statistics.fmean(r["accuracy"] for r in cells[(m, bits[0])])
                     if (m, bits[0]) in cells else 0.0)
    head = "| method | " + " | ".join(f"{b} bit{'s' if b != 1 else ''} | KB" for b in bits) + " |"
    lines = [head, "|:--|" + "--:|--:|" * len(bits)]
    for m in methods:
        parts = []
        for b in bits:
            group = cells.get((m, b), [])
            if not group:
                parts += ["-", "-"]
                continue
            accuracy = [r["accuracy"] for r in group]
            spread = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
            parts += [f"{statistics.fmean(accuracy):.2f} ± {spread:.2f}",
                      f"{statistics.fmean(r['file_bytes'] for r in group) / 1e3:.1f}"]
        lines.append(f"| {m} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def sizes(rows: Rows, args: argparse.Namespace) -> str:
    """The stored file split into its parts, per method and bits, for one seed."""
    chosen = sorted((r for r in rows if r["seed"] == args.seed and "index_bytes" in r),
                    key=lambda r: (r["bits"], r["method"]))
    lines = ["| method | bits | file bytes | index | codebooks | raw | header | header share "
             "| stored bits/weight |", "|:--|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in chosen:
        lines.append(f"| {r['method']} | {r['bits']} | {r['file_bytes']:,} | "
                     f"{r['index_bytes']:,} | {r['codebook_bytes']:,} | {r['raw_bytes']:,} | "
                     f"{r['header_bytes']:,} | {100 * r['header_bytes'] / r['file_bytes']:.1f}% "
                     f"| {r['stored_bits_per_weight']:.3f} |")
    return "\n".join(lines)


def variants(rows: Rows, args: argparse.Namespace) -> str:
    return variants_table(rows)


def size_explore(rows: Rows, args: argparse.Namespace) -> str:
    """Configurations compared on the validation split (the test column is not shown: it
    is not what chooses): per bits, validation accuracy, file bytes, stored bits, zeros."""
    chosen = sorted((r for r in rows if r["method"] != "fp"),
                    key=lambda r: (r["bits"], r["file_bytes"]))
    fp = [r for r in rows if r["method"] == "fp"]
    lines = [f"full precision: {len(fp)} row(s); seeds {sorted({r['seed'] for r in rows})}", "",
             "| bits | method | val acc % | file bytes | stored bits/weight | zeros "
             "| k per tensor |", "|--:|:--|--:|--:|--:|--:|:--|"]
    for r in chosen:
        ks = " ".join(str(layer["k"]) for layer in (r.get("layers") or {}).values())
        lines.append(f"| {r['bits']} | {r['method']} | {r['val_accuracy']:.2f} | "
                     f"{r['file_bytes']:,} | {r['stored_bits_per_weight']:.3f} | "
                     f"{r.get('sparsity') or 0:.1%} | {ks} |")
    return "\n".join(lines)


def assignment(rows: Rows, args: argparse.Namespace) -> str:
    fp = next(r for r in rows if r["variant"] == "full-precision")
    lines = ["| fine-tuning | val | drop |", "|---|--:|--:|",
             f"| full precision | {fp['val']:.2f} | |"]
    lines += [f"| {r['variant']} | {r['val']:.2f} | {fp['val'] - r['val']:.2f} |"
              for r in rows if r is not fp]
    return "\n".join(lines)


def defaults(rows: Rows, args: argparse.Namespace) -> str:
    """Validation accuracy per method, option and bits (the rival methods' defaults)."""
    table: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for r in rows:
        option = json.dumps({**r["options"], **r["recipe"]}) if r["options"] or r["recipe"] \
            else "{} (defaults)"
        table[(r["method"], option)][r["bits"]] = r["val_accuracy"]
    widths = sorted({r["bits"] for r in rows})
    lines = ["| method | option | " + " | ".join(f"{b} bits" for b in widths) + " |",
             "|---|---|" + "--:|" * len(widths)]
    for (method, option), values in table.items():
        cells = [f"{values[b]:.2f}" if b in values else "" for b in widths]
        lines.append(f"| {method} | {option} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def storage(rows: Rows, args: argparse.Namespace) -> str:
    lines = ["| k | weights | coding | file bytes | ideal bytes | file / ideal | index / entropy "
             "| ratio vs float32 | save s | load s |", "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        coding = "range where smaller" if r["entropy_coding"] else "bit-packed"
        lines.append(f"| {r['k']} | {r['weights_from']} | {coding} | {r['file_bytes']:,} | "
                     f"{r['ideal_bytes']:,} | {r['file_over_ideal']:.4f} | "
                     f"{r['index_over_entropy']:.4f} | {r['compression_ratio']:.2f}x | "
                     f"{r['save_seconds']:.2f} | {r['load_seconds']:.2f} |")
    return "\n".join(lines)


def kmeans1d(rows: Rows, args: argparse.Namespace) -> str:
    lines = ["| run | commit | kmeans1d s | scikit-learn s | speed-up | Lloyd s | SSE kmeans1d "
             "| SSE Lloyd | SSE scikit-learn |", "|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {short(r['git_commit'])} | {r['kmeans1d_seconds']:.3f} | "
                     f"{r['sklearn_seconds']:.2f} | {r['speedup_vs_sklearn']:.1f}x | "
                     f"{r['lloyd_seconds']:.2f} | {r['kmeans1d_sse']:.5f} | "
                     f"{r['lloyd_sse']:.5f} | {r['sklearn_sse']:.5f} |")
    return "\n".join(lines)


def median_interval(ratios: list[float], seed: int = 0, draws: int = 2000) -> str:
    """The 95% bootstrap interval of the median of per-round ratios (resampling rounds)."""
    import numpy as np

    values = np.asarray(ratios)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(values, (draws, values.size)), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return f"[{low:.3f}, {high:.3f}]"


def cost(rows: Rows, args: argparse.Namespace) -> str:
    """One table per run of regularizer_cost.py (rows of one commit, round count and set of
    configurations, in file order): each configuration's step over the plain step of the
    same round (median over rounds, and its 95% bootstrap interval over rounds), and, where
    the run has LSQ, over LSQ's step of the same round and in how many rounds it was
    faster."""
    runs: dict[tuple, Rows] = {}
    for r in rows:
        key = (r["git_commit"], r["rounds"], tuple(r["interleaved"]),
               r.get("numba_threading_layer"))
        runs.setdefault(key, []).append(r)
    out = []
    for (commit, rounds, _, layer), group in list(runs.items())[-args.last:]:
        plain = next(r["step_seconds"] for r in group if r["config"] == "plain")
        lsq = next((r["step_seconds"] for r in group if r["config"] == "lsq"), None)
        out += [f"commit {short(commit)}, {rounds} rounds, {group[0]['machine']}, "
                f"{group[0]['threads']} threads" + (f", numba layer {layer}" if layer else ""),
                "", "| configuration | step s (median) | time / plain | 95% interval "
                "| CPU time / plain | peak MiB | memory / plain |"
                + (" time / lsq | 95% interval | rounds faster |" if lsq else ""),
                "|---|--:|--:|--:|--:|--:|--:|" + ("--:|--:|--:|" if lsq else "")]
        for r in group:
            cpu = r.get("cpu_time_ratio")
            over_plain = [a / b for a, b in zip(r["step_seconds"], plain, strict=True)]
            line = (f"| {r['config']} | {r['step_seconds_median']:.3f} | "
                    f"{r['time_ratio']:.3f} | {median_interval(over_plain)} | "
                    f"{'-' if cpu is None else f'{cpu:.3f}'} | "
                    f"{r['peak_bytes'] / 2**20:.0f} | {r['memory_ratio']:.3f} |")
            if lsq:
                ratios = [a / b for a, b in zip(r["step_seconds"], lsq, strict=True)]
                line += (f" {statistics.median(ratios):.3f} | {median_interval(ratios)} | "
                         f"{sum(x < 1 for x in ratios)} of {len(ratios)} |")
            out.append(line)
        out.append("")
    return "\n".join(out).rstrip()


def penalty_pass(rows: Rows, args: argparse.Namespace) -> str:
    """Milliseconds of one pass over the model's weights, per function (the penalty's
    forward pass, or the nearest lookup alone), k (rows) and route; the latest run of each."""
    out = []
    for function in dict.fromkeys(r.get("function", "penalty") for r in rows):
        group = [r for r in rows if r.get("function", "penalty") == function]
        routes = list(dict.fromkeys(r["route"] for r in group))
        ms: dict[int, dict[str, float]] = defaultdict(dict)
        for r in group:  # a later run of the same (k, route) replaces an earlier one
            ms[r["k"]][r["route"]] = r["seconds_median"] * 1e3
        last = group[-1]
        out += [f"{function}: commit {short(last['git_commit'])}, {last['machine']}, "
                f"{last['threads']} threads, {last['weights']:,} weights in "
                f"{last['tensors']} tensors, median of {last['repeat']}", "",
                "| k | " + " | ".join(f"{r} ms" for r in routes) + " |",
                "|--:|" + "--:|" * len(routes)]
        out += [f"| {k} | " + " | ".join(f"{ms[k].get(r, float('nan')):.1f}" for r in routes)
                + " |" for k in sorted(ms)]
        out.append("")
    return "\n".join(out).rstrip()


def deploy(rows: Rows, args: argparse.Namespace) -> str:
    """Sizes and forward latency of the deployment paths, per model and k."""
    lines = ["| model | k | .qz KB | ONNX KB | float32 ONNX KB | dense ms | packed ms "
             "| ONNX Runtime ms | ONNX - PyTorch (max abs) |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['k']} | {r['qz_bytes'] / 1e3:.1f} | "
                     f"{r['onnx_bytes'] / 1e3:.1f} | {r['float32_onnx_bytes'] / 1e3:.1f} | "
                     f"{r['dense_seconds'] * 1e3:.2f} | {r['packed_seconds'] * 1e3:.2f} | "
                     f"{r['onnxruntime_seconds'] * 1e3:.2f} | "
                     f"{r['onnx_max_abs_difference']:.1e} |")
    return "\n".join(lines)


def mean_spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {spread:.2f}"


def interval(d: dict[str, Any] | None) -> str:
    if d is None:
        return "-"
    if d["low"] is None:
        return f"{d['mean']:+.2f} (1 seed)"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def gradl1_widths(rows: Rows, args: argparse.Namespace) -> str:
    """`benchmarks/gradl1_widths.py`: per W/A, the test accuracy of the plainly fine-tuned
    and the gradl1 weight sets (mean ± sample std over seeds) and gradl1 minus plain, paired
    over seeds with its 95% t-interval."""
    accuracy: dict[tuple[str, Any, Any], dict[int, float]] = defaultdict(dict)
    for r in rows:
        accuracy[(r["trained"], r["bits"], r["act_bits"])][r["seed"]] = r["accuracy"]
    widths = sorted({(b, a) for _, b, a in accuracy}, key=lambda w: (-w[0], -(w[1] or 99)))
    lines = ["| W/A | plain fine-tuning | gradl1 | gradl1 - plain |", "|:--|--:|--:|--:|"]
    for b, a in widths:
        plain, reg = accuracy[("fp", b, a)], accuracy[("gradl1", b, a)]
        lines.append(f"| {b}/{a if a is not None else 32} | {mean_spread(list(plain.values()))} "
                     f"| {mean_spread(list(reg.values()))} "
                     f"| {interval(paired_difference(reg, plain))} |")
    return "\n".join(lines)


def cpq_widths(rows: Rows, args: argparse.Namespace) -> str:
    """CPQ's learned bit-widths: per method and bits, test accuracy (mean ± sample std), the
    mean bits per weight its tensors kept (log2 of each tensor's k, weighted by its size),
    stored file KB, and each seed's per-tensor bits in layer order."""
    cells: dict[tuple[str, Any], Rows] = defaultdict(list)
    for r in rows:
        if r["method"] != "fp":
            cells[(r["method"], r["bits"])].append(r)
    lines = ["| method | bits | test acc % | kept bits/weight | file KB | per-tensor bits, "
             "by seed |", "|:--|--:|--:|--:|--:|:--|"]
    for (method, bits), group in sorted(cells.items()):
        group.sort(key=lambda r: r["seed"])
        per_tensor = "; ".join(
            "/".join(f"{math.log2(layer['k']):g}" for layer in r["layers"].values())
            for r in group)
        lines.append(f"| {method} | {bits} | {mean_spread([r['accuracy'] for r in group])} "
                     f"| {statistics.fmean(r['bits_per_weight'] for r in group):.2f} "
                     f"| {statistics.fmean(r['file_bytes'] for r in group) / 1e3:.1f} "
                     f"| {per_tensor} |")
    return "\n".join(lines)


TABLES: dict[str, Callable[[Rows, argparse.Namespace], str]] = {
    "demo": demo, "tuning": tuning, "widths": widths, "sizes": sizes, "variants": variants,
    "assignment": assignment, "defaults": defaults, "storage": storage, "kmeans1d": kmeans1d,
    "cost": cost, "deploy": deploy, "penalty-pass": penalty_pass, "size-explore": size_explore,
    "gradl1-widths": gradl1_widths, "cpq-widths": cpq_widths,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=sorted(TABLES))
    parser.add_argument("results", type=Path, help="the result file the table is built from")
    parser.add_argument("--seed", type=int, default=0, help="sizes: the seed shown")
    parser.add_argument("--last", type=int, default=1000, help="cost: only the last N runs")
    args = parser.parse_args()
    print(TABLES[args.table](read_rows(args.results), args))


if __name__ == "__main__":
    main()
