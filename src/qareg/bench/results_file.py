"""A bench's results file: one JSON line per run, appended as soon as the run ends."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qareg.errors import ConfigError


def bits_key(bits: Any) -> int | float:
    """A row's bits as a key: whole bit-widths as int, fractional budgets as float."""
    value = float(bits)
    return int(value) if value.is_integer() else value


RunKey = tuple[str, int | float, int]  # (method, bits or budget, seed)


def read_done(path: Path, recipe: dict[str, Any]) -> dict[RunKey, dict[str, Any]]:
    """Rows already in the results file, by (method, bits, seed); a file written with
    another recipe is refused (its rows would not be comparable)."""
    done: dict[RunKey, dict[str, Any]] = {}
    if not path.exists():
        return done
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = (row["method"], bits_key(row["bits"]), int(row["seed"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"results file {str(path)!r} line {number} is not a bench result; "
                              "give another --out") from None
        if row.get("recipe") != recipe:
            raise ConfigError(f"results file {str(path)!r} holds runs of another recipe "
                              f"({row.get('recipe')}); this bench is {recipe}: give another "
                              "--out, or the same settings to resume")
        done[key] = row
    return done


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line (creating the folder) and push it to disk before the next run
    starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_choices(path: Path, needed: list[tuple[str, int]]) -> dict[tuple[str, int], Any]:
    """The tuning choice made in results file `path` for each (method, bits) of `needed`
    (from its rows that record one: tuned there, or trained with a choice made at another
    width); a width the file lacks takes the method's choice if the file made only one for
    it (a bench tuned at one width). A pair left without a choice is an error, raised now."""
    choices: dict[tuple[str, int | float], Any] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        tuning = row.get("tuning") or {}
        if "choice" in tuning and "from" not in tuning:
            choices[(row["method"], bits_key(row["bits"]))] = tuning["choice"]
    for method, bits in needed:
        made = {json.dumps(c, sort_keys=True): c for (m, _), c in choices.items() if m == method}
        if (method, bits) not in choices and len(made) == 1:
            choices[(method, bits)] = next(iter(made.values()))
    missing = [f"{method} at {bits} bits" for method, bits in needed
               if (method, bits) not in choices]
    if missing:
        raise ConfigError(f"tuning_from {str(path)!r} has no tuned row for "
                          f"{', '.join(missing)}; tune those first or leave them out")
    return choices
