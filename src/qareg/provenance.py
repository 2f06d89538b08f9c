"""How an artefact was made: package version, git commit, library versions, time."""

from __future__ import annotations

import datetime
import functools
import platform
import subprocess
from pathlib import Path

import torch

# Tracked files that are results, not code: changed by a running bench, they do not make
# the code that wrote them "dirty".
NOT_CODE = (":(top,exclude)benchmarks/results", ":(top,exclude)docs", ":(top,exclude)*.md")


@functools.cache
def git_commit() -> str:
    """The commit of the qareg checkout in use ("+dirty" if code differs from it), or
    "unknown". Read once per process, at the first call: a bench that runs for hours records
    the code it started with, not a HEAD that moved on while it ran (`qareg bench` calls it
    at start); result files, docs and markdown do not count as changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", *NOT_CODE],
            cwd=here, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def provenance() -> dict[str, str]:
    """A record to store beside every checkpoint, result and plot."""
    from qareg.version import __version__

    return {
        "qareg_version": __version__,
        "git_commit": git_commit(),
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
