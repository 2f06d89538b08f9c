"""The commands that compare methods: `bench`, `report`, and the `demo`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qareg.cli.flags import add_flags, build, field_flags, given_values, read_config_file
from qareg.cli.output import check_new_file, check_output, progress_bars, say
from qareg.errors import ConfigError

BENCH_SECTIONS = ("bench", "methods", "variants")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from qareg.bench import BenchConfig
    from qareg.demo import DemoConfig

    p = sub.add_parser("bench", help="compare methods x bits x seeds on one model and dataset; "
                       "resumable, one JSON line per run")
    p.add_argument("--out", required=True, help="JSON-lines results file; runs already in it "
                   "are not rerun")
    p.add_argument("--config", help="YAML file with sections bench (these flags), methods "
                   "(method name -> its options) and variants (new name -> {method: NAME, "
                   "options...}, run as methods of their own)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are drawn only on a terminal anyway)")
    add_flags(p.add_argument_group("BenchConfig"), field_flags(
        BenchConfig, skip=("method_configs", "variants")))
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("report", help="markdown table and plots from bench result files")
    p.add_argument("results", nargs="+", help="JSON-lines files written by qareg bench")
    p.add_argument("--out-dir", help="write report.md and the PNG plots in this folder")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("demo", help="full precision vs post-training k-means vs qareg on "
                       "Fashion-MNIST, in one table of test accuracies")
    p.add_argument("--out", help="also write the table as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are drawn only on a terminal anyway)")
    add_flags(p.add_argument_group("DemoConfig"), field_flags(DemoConfig))
    p.set_defaults(run=cmd_demo)


def bench_config(args: argparse.Namespace) -> Any:
    """BenchConfig: defaults < config file (section bench; section methods: name -> options;
    section variants: name -> {method, options}) < flags. The file is checked whole, its
    errors naming it."""
    from qareg.bench import BenchConfig

    sections = read_config_file(args.config, BENCH_SECTIONS)
    values = dict(sections.get("bench", {}))
    if sections.get("methods"):
        values["method_configs"] = sections["methods"]
    if sections.get("variants"):
        values["variants"] = sections["variants"]
    if args.config is not None:
        build(BenchConfig, values, f"config file {args.config!r}")
    flags = field_flags(BenchConfig, skip=("method_configs", "variants"))
    return build(BenchConfig, {**values, **given_values(args, flags)}, "bench")


def cmd_bench(args: argparse.Namespace) -> int:
    from qareg.bench import Bench

    config = bench_config(args)
    check_output(args.out)
    bench = Bench(config, args.out, progress=progress_bars(args.no_progress))  # reads what is done
    planned = bench.planned()
    todo = [key for key in planned if key not in bench.done]
    say(f"qareg bench: {config.model} on {config.dataset}, {', '.join(config.methods)} at bits "
        f"{' '.join(map(str, config.bits))}, seeds {' '.join(map(str, config.seeds))}")
    say(f"  {len(planned)} runs planned, {len(planned) - len(todo)} already in {args.out}")
    if config.skipped():
        say("  skipped (budgets a method cannot take; post-training quantizers under "
            "--act-bits): " + ", ".join(
            f"{m} at {b}" for m, b in config.skipped()))

    def show(row: dict[str, Any]) -> None:
        say(f"{row['method']:<12} bits {row['bits']:>2} seed {row['seed']}: "
            f"{row['accuracy']:.2f}% (test), {row['file_bytes'] / 1000:.1f} KB "
            f"({row['stored_bits_per_weight']:.2f} stored bits/weight), "
            f"trained {row['train_seconds'] or 0:.0f} s"
            + (f", tuned: {row['tuning']['choice'] or 'as configured'}" if row.get("tuning")
               else ""))

    bench.run(on_row=show)
    say(f"results in {args.out} (test accuracies). Next: qareg report {args.out} --out-dir "
        "DIR")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from qareg.report import (
        load_results,
        markdown_table,
        paired_markdown,
        paired_table,
        summary,
        write_report,
    )

    rows = load_results(args.results)  # fails on bad input before anything is written
    if args.out_dir is not None and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise ConfigError(f"--out-dir {args.out_dir!r} is a file; give a folder")
    say(markdown_table(summary(rows)))
    paired = paired_table(rows)
    if paired:
        say("each qareg configuration minus the other method, paired by seed (test accuracy "
            "points, 95% interval):")
        say(paired_markdown(paired))
    if args.out_dir is None:
        say("accuracies are test accuracies (nothing written; --out-dir DIR writes report.md "
            "and the plots)")
        return 0
    written = write_report(args.results, args.out_dir)
    say(f"wrote {written[0]} and {len(written) - 1} plots in {args.out_dir} (test accuracies)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qareg.checkpoint import atomic_write
    from qareg.demo import DemoConfig, format_table, run_demo

    check_output(args.out)
    if args.out is not None:
        check_new_file(args.out, "--out", args.overwrite)
    config = build(DemoConfig, given_values(args, field_flags(DemoConfig)), "demo")
    result = run_demo(config, progress=progress_bars(args.no_progress))
    say(format_table(result))
    where = "nothing else written"
    if args.out is not None:
        text = json.dumps(result, indent=2).encode() + b"\n"
        atomic_write(args.out, lambda f: f.write(text))
        where = f"wrote {args.out}"
    say(f"test accuracies on Fashion-MNIST's test split; wall time {result['seconds']:.0f} s; "
        f"{where}. Next: qareg train --help, or the README's command-line walk-through")
    return 0
