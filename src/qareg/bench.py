"""`qareg bench`: methods x bits x seeds on one model and dataset, one JSON line per run.

Every method gets the same budget. For each seed one full-precision network is trained for
`pretrain_epochs` (cached beside the results file) and every method then trains a copy of it
for `epochs` more, with its own fine-tuning recipe (`Method.recipe`; `lr` overrides every
method's learning rate):

- training-time methods train one copy per bit-width, then convert it;
- post-training methods (`Method.post_training`) train once per seed and are converted at
  every bit-width; those whose training is plain full-precision training
  (`Method.trains_in_full_precision`: the reference and the post-training quantizers)
  share one fine-tuning, cached too.

Each run is converted the same way (`Method.convert`: the method's grids as codebooks,
batch norm re-estimated), tested, and stored as a compressed file to weigh it. A line is
appended (and flushed to disk) as soon as its run ends, so an interrupted bench resumes
where it stopped: runs already in the file are not rerun. The reference row (the method
that does not quantize, `fp`) has bits 32.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qareg.checkpoint import read_checkpoint, save_checkpoint
from qareg.compress import save_compressed
from qareg.config import DataConfig, TrainConfig, as_dict
from qareg.data import DatasetSplits, load_dataset
from qareg.engine import convert_with_data, train
from qareg.errors import ConfigError
from qareg.evaluation import evaluate
from qareg.memory import peak_bytes, reset_peak
from qareg.methods import METHODS, Method, create_method, list_methods
from qareg.methods.parametrized import latent_weight
from qareg.models import create_model
from qareg.provenance import provenance
from qareg.quantize import quantized_tensors, select_tensors
from qareg.report.histograms import histogram_record
from qareg.validate import check_bits, check_float, check_int

FP_BITS = 32  # the "bits" of the full-precision reference row


def reference_method() -> str:
    """The name of the registered method that does not quantize: every bench's reference."""
    names = [name for name in list_methods() if not METHODS.get(name).quantizes]
    assert len(names) == 1, f"exactly one reference method must be registered, got {names}"
    return names[0]


def _check_names(name: str, values: Any, valid: list[str]) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{name} must be a non-empty list, one or more of {', '.join(valid)}; "
                          f"got {values!r}")
    for value in values:
        if value not in valid:
            raise ConfigError(f"{name}: unknown {value!r}; valid: {', '.join(valid)}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name} must not repeat a value, got {list(values)!r}")
    return tuple(values)


def _check_ints(name: str, values: Any, check: Callable[[Any], Any]) -> tuple[int, ...]:
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{name} must be a non-empty list of integers, got {values!r}")
    for value in values:
        check(value)
    if len(set(values)) != len(values):
        raise ConfigError(f"{name} must not repeat a value, got {list(values)!r}")
    return tuple(values)


@dataclass(frozen=True)
class BenchConfig:
    """One comparison: which methods, bit-widths and seeds, on what, with what budget."""

    model: str = "lenet5"  # a name from qareg.list_models()
    dataset: str = "fashion-mnist"  # a name from qareg.data.list_datasets()
    # methods compared (registered names); the reference, fp, always runs as well
    methods: tuple[str, ...] = ("ptq-kmeans", "ptq-uniform", "qareg", "qareg-reg", "qareg-ste",
                                "cpq", "gradl1", "lsq", "dkm")
    bits: tuple[int, ...] = (1, 2, 3, 4)  # bit-widths; k = 2**bits for codebook methods
    seeds: tuple[int, ...] = (0, 1, 2)  # one network per seed, trained from scratch
    pretrain_epochs: int = 4  # shared full-precision training, per seed (SGD, lr 0.05)
    epochs: int = 3  # every method's own training budget, from the pretrained network
    lr: float | None = None  # every method's learning rate; None: each method's recipe
    pretrain_lr: float = 0.05  # SGD learning rate of the shared pretraining
    batch_size: int = 128  # images per step, in both phases
    data_dir: str | None = None  # dataset folder; None: $QAREG_DATA or the default
    val_size: int = 5000  # training images held out (not trained on; for choices)
    augment: bool = True  # the dataset's usual augmentation, in both phases
    device: str = "cpu"  # cpu, cuda, cuda:N or mps
    method_configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> fields

    def __post_init__(self) -> None:
        # the fields they share with the data and training configs, checked by them
        DataConfig(dataset=self.dataset, data_dir=self.data_dir, val_size=self.val_size,
                   augment=self.augment)
        TrainConfig(model=self.model, epochs=self.epochs, batch_size=self.batch_size,
                    lr=self.pretrain_lr, device=self.device)
        valid = [m for m in list_methods() if METHODS.get(m).quantizes]
        object.__setattr__(self, "methods", _check_names("methods", self.methods, valid))
        object.__setattr__(self, "bits", tuple(sorted(_check_ints("bits", self.bits,
                                                                  check_bits))))
        object.__setattr__(self, "seeds", _check_ints(
            "seeds", self.seeds, lambda s: check_int("seed", s, 0)))
        check_int("pretrain_epochs", self.pretrain_epochs, 0)
        check_float("pretrain_lr", self.pretrain_lr, 0, low_open=True)
        if self.lr is not None:
            check_float("lr", self.lr, 0, low_open=True)
        if not isinstance(self.method_configs, dict):
            raise ConfigError(f"method_configs must map method names to fields, got "
                              f"{self.method_configs!r}")
        for name in self.method_configs:
            if name not in list_methods():
                raise ConfigError(f"method_configs: unknown method {name!r}; valid: "
                                  f"{', '.join(list_methods())}")
            self.method(name)  # validates the fields now, not after hours of training

    def method(self, name: str) -> Method:
        """A fresh instance of method `name` with this bench's config for it."""
        return create_method(name, dict(self.method_configs.get(name, {})))

    def pretraining(self, seed: int) -> TrainConfig:
        return TrainConfig(model=self.model, epochs=self.pretrain_epochs, optimizer="sgd",
                           lr=self.pretrain_lr, batch_size=self.batch_size, seed=seed,
                           device=self.device)

    def method_training(self, method: Method, seed: int) -> TrainConfig:
        """The recipe `method` trains with: its own (`Method.recipe`), this bench's epochs,
        batch size and seed, and `lr` when given."""
        recipe = {**method.recipe, **({"lr": self.lr} if self.lr is not None else {})}
        return TrainConfig(model=self.model, epochs=self.epochs, batch_size=self.batch_size,
                           seed=seed, device=self.device, **recipe)

    def recipe(self) -> dict[str, Any]:
        """What every row of one results file must share (checked when resuming)."""
        keep = ("model", "dataset", "pretrain_epochs", "epochs", "lr", "pretrain_lr",
                "batch_size", "val_size", "augment")
        return {k: getattr(self, k) for k in keep}


RunKey = tuple[str, int, int]  # (method, bits, seed)


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
            key = (row["method"], int(row["bits"]), int(row["seed"]))
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


def latent_weights(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """The full-precision values behind each named weight (under a parametrization: the
    original tensor it quantizes), copied to the CPU."""
    out = {}
    for name in names:
        module_name, _, attribute = name.rpartition(".")
        value = latent_weight(model.get_submodule(module_name), attribute)
        out[name] = value.detach().float().cpu().clone()
    return out


class Bench:
    """Runs a `BenchConfig`, appending rows to `out`; see the module docstring."""

    def __init__(self, config: BenchConfig, out: str | Path, progress: bool = True) -> None:
        self.config = config
        self.out = Path(out)
        self.cache = self.out.with_name(self.out.name + ".cache")  # pretrained networks
        self.progress = progress
        self.done = read_done(self.out, config.recipe())
        self.splits: DatasetSplits | None = None

    def planned(self) -> list[RunKey]:
        """Every run of the bench, in the order it is run (the reference first per seed)."""
        c = self.config
        runs = []
        for seed in c.seeds:
            runs.append((reference_method(), FP_BITS, seed))
            runs += [(m, b, seed) for m in c.methods for b in c.bits]
        return runs

    def run(self, on_row: Callable[[dict[str, Any]], None] | None = None
            ) -> list[dict[str, Any]]:
        """Run what is missing from the results file; returns the rows written now, each
        also handed to `on_row` as soon as it is on disk."""
        todo = [key for key in self.planned() if key not in self.done]
        written = []
        if not todo:
            return written
        c = self.config
        self.splits = load_dataset(c.dataset, c.data_dir, val_size=c.val_size)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(exist_ok=True)
        bar = tqdm(total=len(todo), desc="bench", disable=not self.progress, dynamic_ncols=True)
        reference = reference_method()
        for seed in c.seeds:
            for method_name in (reference, *c.methods):
                bits = [FP_BITS] if method_name == reference else list(c.bits)
                missing = [b for b in bits if (method_name, b, seed) not in self.done]
                if not missing:
                    continue
                bar.set_postfix_str(f"{method_name} seed {seed}")
                for row in self._run_method(method_name, missing, seed):
                    append_row(self.out, row)
                    self.done[(row["method"], row["bits"], row["seed"])] = row
                    written.append(row)
                    bar.update(1)
                    if on_row is not None:
                        on_row(row)
        bar.close()
        return written

    # --- networks -------------------------------------------------------------------------

    def _cached(self, name: str, build: Callable[[], tuple[nn.Module, dict[str, Any]]]
                ) -> tuple[nn.Module, dict[str, Any]]:
        """The network cached as `name`, built (and saved atomically) if absent."""
        path = self.cache / f"{name}.pt"
        if path.exists():
            payload = read_checkpoint(path)
            if payload["meta"].get("recipe") == self.config.recipe():
                model = create_model(**payload["model_spec"])
                model.load_state_dict(payload["state_dict"])
                return model.to(self.config.device), payload["meta"]
        model, meta = build()
        save_checkpoint(path, model, {**meta, "recipe": self.config.recipe()})
        return model, meta

    def _new_model(self, seed: int) -> nn.Module:
        s = self.splits
        torch.manual_seed(seed)
        return create_model(self.config.model, s.num_classes, s.in_channels,
                            s.input_size).to(self.config.device)

    def pretrained(self, seed: int) -> nn.Module:
        """The full-precision network every method starts from (cached per seed)."""

        def build() -> tuple[nn.Module, dict[str, Any]]:
            model = self._new_model(seed)
            start = time.perf_counter()
            train(model, self.splits, self.config.pretraining(seed),
                  augment=self.config.augment, progress=self.progress,
                  description=f"pretrain seed {seed}")
            return model, {"seconds": time.perf_counter() - start}

        return self._cached(f"pretrain-seed{seed}", build)[0]

    def _train(self, method: Method, model: nn.Module, seed: int, bits: int | None,
               label: str) -> dict[str, Any]:
        """Prepare `model` for `method` and train it; returns time and peak memory."""
        config = self.config.method_training(method, seed)
        method.prepare(model, bits, seed)
        reset_peak(self.config.device)
        start = time.perf_counter()
        history = train(model, self.splits, config, method, augment=self.config.augment,
                        progress=self.progress, description=label)
        return {"train_seconds": time.perf_counter() - start,
                "peak_memory_bytes": peak_bytes(self.config.device),
                "final_task_loss": history[-1].task_loss if history else None}

    # --- runs -----------------------------------------------------------------------------

    def _run_method(self, name: str, bits_list: list[int], seed: int) -> list[dict[str, Any]]:
        method = self.config.method(name)
        start_model = self.pretrained(seed)
        names = select_tensors(start_model)
        before = latent_weights(start_model, names)
        if not method.post_training:  # one training per bit-width
            rows = []
            for bits in bits_list:
                model, method = copy.deepcopy(start_model), self.config.method(name)
                stats = self._train(method, model, seed, bits, f"{name} {bits}b seed {seed}")
                after = latent_weights(model, names)
                rows.append(self._finish(method, model, bits, seed, stats, before, after))
            return rows
        if method.trains_in_full_precision():  # convert one shared fine-tuning
            trained, stats = self._fine_tuned_fp(seed, start_model)
        else:
            trained = copy.deepcopy(start_model)
            stats = self._train(method, trained, seed, None, f"{name} seed {seed}")
        after = latent_weights(trained, names)
        if not method.quantizes:
            return [self._fp_row(trained, seed, stats)]
        return [self._finish(method, copy.deepcopy(trained), bits, seed, stats, before, after)
                for bits in bits_list]

    def _fine_tuned_fp(self, seed: int, start_model: nn.Module
                       ) -> tuple[nn.Module, dict[str, Any]]:
        """The pretrained network trained `epochs` more in full precision (cached)."""
        reference = reference_method()

        def build() -> tuple[nn.Module, dict[str, Any]]:
            model = copy.deepcopy(start_model)
            stats = self._train(self.config.method(reference), model, seed, None,
                                f"{reference} seed {seed}")
            return model, stats

        model, meta = self._cached(f"{reference}-seed{seed}", build)
        return model, {k: meta.get(k) for k in ("train_seconds", "peak_memory_bytes",
                                                 "final_task_loss")}

    def _base_row(self, method: Method, bits: int, seed: int, stats: dict[str, Any]
                  ) -> dict[str, Any]:
        c = self.config
        return {"method": method.name, "bits": bits, "seed": seed, "model": c.model,
                "dataset": c.dataset, "epochs": c.epochs, "pretrain_epochs": c.pretrain_epochs,
                **stats, "recipe": c.recipe(), "config": method.options(),
                "train": as_dict(c.method_training(method, seed)),
                "device": c.device, **provenance()}

    def _fp_row(self, model: nn.Module, seed: int, stats: dict[str, Any]) -> dict[str, Any]:
        accuracy = evaluate(model, self.splits.test, self.splits, self.config.device)
        float32_bytes = sum(t.numel() * 4 for t in model.state_dict().values()
                            if t.is_floating_point())
        quantizable = sum(model.get_parameter(n).numel() for n in select_tensors(model))
        row = self._base_row(self.config.method(reference_method()), FP_BITS, seed, stats)
        row.update(accuracy=accuracy, bits_per_weight=float(FP_BITS), file_bytes=float32_bytes,
                   stored_bits_per_weight=8 * float32_bytes / quantizable,
                   compression_ratio=1.0)
        return row

    def _finish(self, method: Method, model: nn.Module, bits: int, seed: int,
                stats: dict[str, Any], before: dict[str, Tensor], after: dict[str, Tensor]
                ) -> dict[str, Any]:
        """Convert `model` with `method` at `bits`, test and weigh it: one result row."""
        start = time.perf_counter()
        report = convert_with_data(model, self.splits, self.config.method_training(method, seed),
                                   method, bits)
        quantize_seconds = time.perf_counter() - start
        accuracy = evaluate(model, self.splits.test, self.splits, self.config.device)
        grids = {t.name: t.codebook.representatives().detach().cpu()
                 for t in quantized_tensors(model)}
        with tempfile.TemporaryDirectory(prefix="qareg-bench-") as folder:
            stored = save_compressed(model, Path(folder) / "model.qz",
                                     meta={"method": method.name, "bits": bits, "seed": seed})
        row = self._base_row(method, bits, seed, stats)
        row.update(
            accuracy=accuracy,
            k=max(t.k for t in report.tensors),
            bits_per_weight=report.bits_per_weight,
            file_bytes=stored.file_bytes,
            stored_bits_per_weight=stored.stored_bits_per_weight,
            index_bytes=stored.index_bytes,
            codebook_bytes=stored.codebook_bytes,
            raw_bytes=stored.raw_bytes,
            header_bytes=stored.header_bytes,
            compression_ratio=stored.compression_ratio,
            quantize_seconds=quantize_seconds,
            distinct_values=max(t.distinct for t in report.tensors),
            histograms=histogram_record(before, after, grids),
        )
        return row
