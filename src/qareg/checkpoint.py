"""Checkpoints: model weights (codebooks included) plus how they were made, written atomically.

A checkpoint is a `torch.save` dict of tensors and plain values, loaded with
`weights_only=True`, so loading a file from someone else never runs code.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qareg.act_quant import attach_like
from qareg.errors import ConfigError
from qareg.filetypes import describe, sniff
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


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any],
                    train_state: dict[str, Any] | None = None) -> None:
    """Save `model` (built by `create_model`) with `meta` (config, seed, metrics...) and,
    for a run still training, the `train_state` that `qareg.engine.train` hands out."""
    spec = getattr(model, "qareg_model_spec", None)
    assert spec is not None, "save_checkpoint needs a model built by qareg.create_model"
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_spec": dict(spec),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": {**meta, **provenance()},
    }
    if train_state is not None:
        payload["train_state"] = train_state
    atomic_write(path, lambda f: torch.save(payload, f))


EXPECTED = ("expected a qareg checkpoint: a .pt file written by qareg train or qareg "
            "quantize")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path` as saved (model_spec, state_dict, meta, maybe train_state),
    read without running any code from the file."""
    path = Path(path)
    kind = sniff(path)
    if kind == "missing":
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    if kind != "checkpoint":
        raise ConfigError(f"{describe(path)}; {EXPECTED}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unpickling errors come in many types, with unhelpful messages
        raise ConfigError(f"{str(path)!r} is a PyTorch archive that cannot be read as a qareg "
                          f"checkpoint (truncated, or holding Python objects); "
                          f"{EXPECTED}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r} is a PyTorch file but not a qareg checkpoint (no "
                          f"qareg format record); {EXPECTED}")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{str(path)!r} has checkpoint format version {payload.get('format_version')!r}; "
            f"this qareg reads version {FORMAT_VERSION}"
        )
    return payload


def model_from_checkpoint(payload: dict[str, Any], device: str = "cpu",
                          prepare: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """The network of a checkpoint read by `read_checkpoint`, codebooks restored.

    `prepare(model)` attaches what a method's training added (quantizers, hooks) before the
    state is loaded; `qareg.runs` passes the method that saved an unfinished run.
    """
    model = create_model(**payload["model_spec"])
    if prepare is not None:
        prepare(model)
    else:
        prepare_like(model, payload["state_dict"])
    import qareg.methods  # noqa: F401  (registers the methods' own input-quantizer kinds)

    attach_like(model, payload["state_dict"])  # quantized layer inputs, if it has them
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ConfigError(f"the checkpoint's weights do not fit {payload['model_spec']['name']}"
                          f" as rebuilt: {str(error).splitlines()[0]}") from None
    return model.to(device)


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model saved at `path` (codebooks restored) on `device`, and its metadata."""
    payload = read_checkpoint(path)
    return model_from_checkpoint(payload, device), payload["meta"]
