"""A training run as `qareg train` makes it, for every method alike: what defines it
(`RunSpec`), the rules for what `--out` may hold before it starts (`run_to_resume`), the
checkpoint written after every epoch, resuming, the stop on NaN, and at the end the trained
network made a quantized one (`Method.convert`) and saved.

The rules of `--out`:
- nothing there: a new run;
- an unfinished run (killed, or stopped): `resume=True` continues it, with the same spec
  (only the device may change); without it, the run is refused and the file kept;
- a finished run, or any other file: refused unless `overwrite=True`. Even then the old
  file stays until the new run's first epoch replaces it (atomically).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qareg.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from qareg.config import DataConfig, TrainConfig, as_dict
from qareg.data import DatasetSplits, load_dataset
from qareg.distributed import init_from_env, leave_process_group
from qareg.engine import EpochMetrics, convert_with_data, train
from qareg.errors import ConfigError, TrainingDiverged
from qareg.evaluation import evaluate
from qareg.filetypes import describe, sniff
from qareg.methods import Method, create_method
from qareg.models import create_model
from qareg.quantize import ConversionReport


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run; saved in its checkpoint, compared on resume."""

    method: Method  # created with its options
    bits: int | None  # the bit-width it trains or is converted at (None: fp, or qareg's k)
    init_from: str | None  # checkpoint fine-tuned, or None for a new network
    data: DataConfig
    train: TrainConfig

    def sections(self) -> dict[str, Any]:
        """The config sections as plain values (as saved in the checkpoint)."""
        return {"data": as_dict(self.data), "train": as_dict(self.train),
                "method": self.method.options()}

    def meta(self) -> dict[str, Any]:
        return {"method": self.method.name, "bits": self.bits, "seed": self.train.seed,
                "init_from": self.init_from, "converted": False, "config": self.sections()}


def saved_sections(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The config sections of a saved run (the method's options were in section
    "regularizer" for qareg runs of the last release)."""
    config = meta.get("config") or {}
    method = config.get("method") or config.get("regularizer") or {}
    return {"data": config.get("data") or {}, "train": config.get("train") or {},
            "method": method}


def run_to_resume(out: str | Path, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Apply the rules of `--out` (module docstring); returns the unfinished run to resume,
    or None for a new run. Raises ConfigError, touching nothing, when refused."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it; "
                          "give one of them")
    kind = sniff(out)
    if kind == "missing":
        return None
    payload = read_checkpoint(out) if kind == "checkpoint" else None
    if payload is not None and "train_state" in payload:
        if overwrite:
            return None
        if not resume:
            state, total = payload["train_state"], saved_sections(payload["meta"])["train"]
            raise ConfigError(
                f"{str(out)!r} holds an unfinished run (epoch {state['epoch']} of "
                f"{total.get('epochs', '?')}); pass --resume to continue it, --overwrite to "
                "start it again, or choose another --out")
        return payload
    if overwrite:
        return None
    what = (f"holds a finished run ({payload['meta'].get('method')})" if payload is not None
            else f"exists ({describe(out).partition(' ')[2]})")
    if resume:
        raise ConfigError(f"--resume: {str(out)!r} {what}, nothing to resume; pass --overwrite "
                          "to train again, or choose another --out")
    raise ConfigError(f"{str(out)!r} {what}; pass --overwrite to replace it, or choose another "
                      "--out")


def check_same_run(saved: dict[str, Any], spec: RunSpec, path: str | Path) -> None:
    """Resuming continues the same run: only the device may change."""
    changed = [name for name, now, before in (("--method", spec.method.name, saved["method"]),
                                              ("--bits", spec.bits, saved.get("bits")),
                                              ("--init-from", spec.init_from,
                                               saved.get("init_from")))
               if now != before]
    before = saved_sections(saved)
    if before["method"]:  # as built: names of the last release read as today's
        before["method"] = method_of(saved).options()
    for section, now in spec.sections().items():
        changed += [f"{section}.{k}" for k in now
                    if k != "device" and now[k] != before[section].get(k, now[k])]
    if changed:
        raise ConfigError(f"--resume continues the run saved in {str(path)!r}, but "
                          f"{', '.join(changed)} differ from it; drop those flags, or start a "
                          "new run with another --out")


def method_of(meta: dict[str, Any]) -> Method:
    """The method of a saved run, with the options it was saved with."""
    options = saved_sections(meta)["method"]
    return create_method(meta.get("method") or "fp", options)


def load_run(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The network of any checkpoint `qareg train` or `qareg quantize` wrote, finished or
    not (an unfinished one is rebuilt with its method's quantizers), and its metadata."""
    payload = read_checkpoint(path)
    meta = payload["meta"]
    if "train_state" not in payload or meta.get("converted"):
        return model_from_checkpoint(payload, device), meta
    method = method_of(meta)

    def prepare(model: nn.Module) -> None:
        method.prepare(model, meta.get("bits"), meta["seed"])

    return model_from_checkpoint(payload, device, prepare), meta


@dataclass
class RunResult:
    """What a finished run leaves."""

    history: list[EpochMetrics]
    report: ConversionReport | None  # None: a full-precision run
    val_accuracy: float | None  # of the saved network (quantized where the method does)
    splits: DatasetSplits
    is_main: bool  # False on the other ranks of a multi-process run (they save nothing)


def _initial_model(spec: RunSpec, splits: DatasetSplits) -> nn.Module:
    """The network to train: the `init_from` checkpoint's, checked against the data, or a
    new one."""
    if spec.init_from is None:
        return create_model(spec.train.model, splits.num_classes, splits.in_channels,
                            splits.input_size)
    model, _ = load_run(spec.init_from)
    spec_of = model.qareg_model_spec
    expected = (splits.num_classes, splits.in_channels, splits.input_size)
    if (spec_of["num_classes"], spec_of["in_channels"], spec_of["input_size"]) != expected:
        raise ConfigError(f"{spec.init_from!r} was built for {spec_of['in_channels']}x"
                          f"{spec_of['input_size']}x{spec_of['input_size']} images and "
                          f"{spec_of['num_classes']} classes; {splits.name} has "
                          f"{expected[1]}x{expected[2]}x{expected[2]} and {expected[0]}")
    return model


def run_training(spec: RunSpec, out: str | Path, metrics: str | Path | None, *,
                 resume_from: dict[str, Any] | None = None, progress: bool = True,
                 on_epoch: Callable[[EpochMetrics], None] | None = None,
                 on_start: Callable[[RunSpec], None] | None = None) -> RunResult:
    """Train `spec` into `out` (checkpoint after every epoch, resumable), then convert the
    network where the method quantizes and save it; `resume_from`: the unfinished run that
    `run_to_resume` returned. `on_start(spec)` runs once the data and the network are ready,
    before the first step (on the main process only)."""
    d = spec.data
    splits = load_dataset(d.dataset, d.data_dir, download=d.download, val_size=d.val_size,
                          split_seed=d.split_seed)
    world, device = init_from_env(spec.train.device)
    config = dataclasses.replace(spec.train, device=device)
    method = spec.method
    torch.manual_seed(config.seed)
    if resume_from is not None:
        model = model_from_checkpoint(resume_from, device,
                                      lambda m: method.prepare(m, spec.bits, config.seed))
    else:
        model = _initial_model(spec, splits).to(device)
        method.prepare(model, spec.bits, config.seed)
    meta = spec.meta()
    saved_epoch = resume_from["train_state"]["epoch"] if resume_from is not None else 0

    def save_state(state: dict[str, Any]) -> None:  # every epoch: a checkpoint to resume from
        nonlocal saved_epoch
        save_checkpoint(out, model, meta, train_state=state)
        saved_epoch = state["epoch"]

    if world.is_main and on_start is not None:
        on_start(spec)
    try:
        history = train(model, splits, config, method, augment=d.augment, metrics_path=metrics,
                        progress=progress, on_epoch=on_epoch, save_state=save_state,
                        resume=resume_from["train_state"] if resume_from is not None else None)
    except TrainingDiverged as error:
        kept = (f"the last good checkpoint (epoch {saved_epoch}) is kept in {str(out)!r}; "
                "resume it with --resume after lowering the learning rate or lambda"
                if saved_epoch else "no epoch finished, so nothing was saved")
        raise TrainingDiverged(f"{error}; {kept}") from None
    finally:
        leave_process_group(world)
    if not world.is_main:
        return RunResult(history, None, None, splits, is_main=False)
    report = None
    if method.quantizes:
        report = convert_with_data(model, splits, config, method, spec.bits)
        meta["converted"] = True
    accuracy = evaluate(model, splits.val, splits, device) if len(splits.val) else None
    meta["val_accuracy"] = accuracy
    save_checkpoint(out, model, meta)  # finished: no optimizer state to carry
    return RunResult(history, report, accuracy, splits, is_main=True)
