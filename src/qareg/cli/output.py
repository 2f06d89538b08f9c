"""What the commands print, and the checks of where they write, shared by every command.

Every command ends with one plain line: what it wrote (or that it wrote nothing), which
split a number is measured on, and the command that usually comes next. Progress bars are
drawn only on a terminal; elsewhere, and with --no-progress, training prints one line per
epoch instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from qareg.engine import EpochMetrics
from qareg.errors import ConfigError


def progress_bars(no_progress: bool) -> bool:
    """Whether to draw progress bars: asked for, and stderr is a terminal."""
    return not no_progress and sys.stderr.isatty()


def say(text: str = "") -> None:
    """Print a line without breaking a progress bar."""
    tqdm.write(text, file=sys.stdout)


def epoch_line(m: EpochMetrics, epochs: int) -> str:
    """One line per epoch: losses, lambda, validation accuracies, time."""
    parts = [f"epoch {m.epoch}/{epochs}", f"loss {m.task_loss:.4f}"]
    if m.penalty or m.lam:
        parts.append(f"penalty {m.penalty:.3g} x lambda {m.lam:.3g}")
    parts.append(f"val {m.val_accuracy:.2f}%")
    if m.val_accuracy_quantized is not None:
        parts.append(f"val quantized {m.val_accuracy_quantized:.2f}%")
    parts.append(f"{m.seconds:.0f} s")
    return "  ".join(parts)


def percent(value: float | None, split: str) -> str:
    """'validation accuracy 88.12%', or a note that there is no such split."""
    if value is None:
        return f"no {split} split to measure"
    return f"{split} accuracy {value:.2f}%"


def check_output(path: str | None, flag: str = "--out") -> None:
    """Fail early, before any work, if `path` cannot be written."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} {path!r} is a folder; give a file name")
    parent = Path(os.path.abspath(target)).parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())  # created if missing
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path!r}: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path!r}: no permission to write in {str(existing)!r}")


def check_not_input(path: str, flag: str, source: str) -> None:
    """Writing `path` must not replace the file `source` that the command reads."""
    if Path(path).resolve() == Path(source).resolve():
        raise ConfigError(f"{flag} {path!r} is the input file; give another file name")


def check_new_file(path: str, flag: str, overwrite: bool) -> None:
    """An existing `path` is replaced only with --overwrite."""
    if Path(path).exists() and not overwrite:
        raise ConfigError(f"{flag} {path!r} exists; pass --overwrite to replace it, or give "
                          "another file name")


def check_derived_file(path: str, flag: str, source: str, overwrite: bool) -> None:
    """A file a command writes from `source`: writable, not `source`, new or --overwrite."""
    check_output(path, flag)
    check_not_input(path, flag, source)
    check_new_file(path, flag, overwrite)


def stem_with(path: str, suffix: str) -> str:
    """`path` with its extension replaced: runs/fp.pt -> runs/fp-k4.pt for suffix '-k4.pt'."""
    p = Path(path)
    return str(p.with_name(p.stem + suffix))
