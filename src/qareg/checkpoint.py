"""Checkpoints: model weights (codebooks included) plus how they were made, written atomically.

A checkpoint is a `torch.save` dict of tensors and plain values, loaded with
`weights_only=True`, so loading a file from someone else never runs code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qareg.errors import ConfigError
from qareg.models import create_model
from qareg.provenance import provenance
from qareg.quantize import prepare_like

FORMAT = "qareg-checkpoint"
FORMAT_VERSION = 1


def atomic_write(path: str | Path, write: Any) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, fsync, then rename it
    over `path`: a crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Save `model` (built by `create_model`) with `meta` (config, seed, metrics...)."""
    spec = getattr(model, "qareg_model_spec", None)
    assert spec is not None, "save_checkpoint needs a model built by qareg.create_model"
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_spec": dict(spec),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": {**meta, **provenance()},
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model saved at `path` (codebooks restored) on `device`, and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise ConfigError(f"{str(path)!r} is not a readable qareg checkpoint: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r} is not a qareg checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{str(path)!r} has checkpoint format version {payload.get('format_version')!r}; "
            f"this qareg reads version {FORMAT_VERSION}"
        )
    model = create_model(**payload["model_spec"])
    prepare_like(model, payload["state_dict"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device), payload["meta"]
