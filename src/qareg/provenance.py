"""How an artefact was made: package version, git commit, library versions, time."""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    """The commit of the qareg checkout in use ("+dirty" if it has changes), or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
            capture_output=True, text=True, timeout=5, check=True,
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
