"""The `qareg` command: a thin argparse front over the library.

Flags are generated from the config dataclasses (`qareg.cli.flags`); a YAML file given with
`--config` sets defaults by section. Any bad input ends with a message naming it and exit
code 2, before anything is written; a run that diverges ends with exit code 1.
`--plugin FILE` (repeatable, before or after the command) loads methods defined outside the
package before the flags are built, so their names and options are known.
"""

from __future__ import annotations

import argparse
import sys

from qareg.cli import compare, files, sweep, train
from qareg.errors import QaregError, TrainingDiverged
from qareg.plugins import load_plugin


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qareg", description="Compress networks by quantization-aware regularization.")
    parser.add_argument("--plugin", action="append", metavar="FILE",
                        help="a Python file registering methods (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_parser(sub)
    files.add_parsers(sub)
    sweep.add_parser(sub)
    compare.add_parsers(sub)
    for name in ("train", "bench"):  # also accepted after the command
        sub.choices[name].add_argument("--plugin", action="append", metavar="FILE",
                                       help="a Python file registering methods (repeatable)")
    return parser


def _plugins(argv: list[str]) -> list[str]:
    """The --plugin files anywhere in `argv` (they must be loaded before the parser is
    built: they add methods and options)."""
    found = []
    for i, item in enumerate(argv):
        if item == "--plugin" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif item.startswith("--plugin="):
            found.append(item.partition("=")[2])
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    words = [a for i, a in enumerate(argv) if i == 0 or argv[i - 1] != "--plugin"]
    command = next((a for a in words if not a.startswith("-")), "qareg")
    try:
        for path in _plugins(argv):
            load_plugin(path)
    except QaregError as error:
        print(f"qareg {command}: error: {error}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except QaregError as error:
        print(f"qareg {args.command}: error: {error}", file=sys.stderr)
        return 1 if isinstance(error, TrainingDiverged) else 2
    except KeyboardInterrupt:
        print(f"qareg {args.command}: interrupted", file=sys.stderr)
        return 130
