"""Peak memory of a stretch of work: CUDA allocator peak, or the process's peak resident set.

On CUDA the figure is `torch.cuda.max_memory_allocated` since `reset_peak`. On Linux CPUs
it is the kernel's high-water mark of resident memory (VmHWM), reset to the current resident
size by writing 5 to /proc/self/clear_refs: the whole process (Python, the dataset, torch)
is included, so compare runs of one process, not absolute numbers across machines.
Elsewhere the peak is unknown (None).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def reset_peak(device: str | torch.device) -> None:
    """Start a new peak-memory measurement on `device`."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass  # not Linux, or not allowed: peak_bytes then reports the process's lifetime peak


def peak_bytes(device: str | torch.device) -> int | None:
    """Peak memory since `reset_peak(device)`, in bytes; None where it cannot be read."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return _status_bytes("VmHWM")
