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

Tuning (`tune_trials` N > 0): every method that trains gets the same N trials, the first N
candidates of its `search_space`, on the first seed (at every width, or at `tune_bits`
only); the one with the best accuracy on the validation split after conversion is reported
for that seed and trained again for the others (and the other widths). `tuning_from` trains
the choices another bench's tuning made. Each row records the trials and the choice. The
test split is read once per row, after its choice is made.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qareg.bench.config import FP_BITS, BenchConfig, reference_method
from qareg.bench.results_file import RunKey, append_row, read_choices, read_done
from qareg.checkpoint import read_checkpoint, save_checkpoint
from qareg.compress import save_compressed
from qareg.config import as_dict
from qareg.data import DatasetSplits, load_dataset
from qareg.engine import convert_with_data, train
from qareg.errors import ConfigError
from qareg.evaluation import evaluate
from qareg.memory import peak_bytes, reset_peak
from qareg.methods import Method
from qareg.methods.parametrized import latent_weight
from qareg.models import create_model
from qareg.provenance import git_commit, provenance
from qareg.quantize import quantized_tensors, select_tensors
from qareg.report.histograms import histogram_record


@dataclass
class Trained:
    """One trained network of a run, with what made it."""

    method: Method
    model: nn.Module
    stats: dict[str, Any]  # train_seconds, peak_memory_bytes, final_task_loss
    choice: dict[str, Any]  # the tuning choice it was trained with ({}: as configured)


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
        git_commit()  # read now: rows record the code this process started with
        self.out = Path(out)
        self.cache = self.out.with_name(self.out.name + ".cache")  # pretrained networks
        self.progress = progress
        self.done = read_done(self.out, config.recipe())
        self.splits: DatasetSplits | None = None
        self.borrowed = None  # (method, bits) -> choice, from config.tuning_from
        if config.tuning_from is not None:
            self.borrowed = read_choices(Path(config.tuning_from), [
                (config.base_name(name), bits) for name in config.tuned_methods()
                for bits in config.bits if config.runs_at(name, bits)])

    def planned(self) -> list[RunKey]:
        """Every run of the bench, in the order it is run (the reference first per seed)."""
        c = self.config
        runs = []
        for seed in c.seeds:
            runs.append((reference_method(), FP_BITS, seed))
            runs += [(m, b, seed) for m in c.methods for b in c.bits if c.runs_at(m, b)]
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
                bits = [FP_BITS] if method_name == reference else [
                    b for b in c.bits if c.runs_at(method_name, b)]
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
               label: str, choice: dict[str, Any] | None = None) -> dict[str, Any]:
        """Prepare `model` for `method` and train it; returns time and peak memory."""
        config = self.config.method_training(method, seed, choice)
        method.prepare(model, bits, seed)
        reset_peak(self.config.device)
        start = time.perf_counter()
        history = train(model, self.splits, config, method, augment=self.config.augment,
                        progress=self.progress, description=label)
        return {"train_seconds": time.perf_counter() - start,
                "peak_memory_bytes": peak_bytes(self.config.device),
                "final_task_loss": history[-1].task_loss if history else None}

    def _train_choice(self, name: str, choice: dict[str, Any], bits: int | None, seed: int
                      ) -> Trained:
        """A copy of the pretrained network trained by `name` with a tuning `choice`."""
        method, model = self.config.method(name, choice), copy.deepcopy(self.pretrained(seed))
        label = f"{name}{f' {bits}b' if bits else ''} seed {seed}{f' {choice}' if choice else ''}"
        stats = self._train(method, model, seed, bits, label, choice)
        return Trained(method, model, stats, choice)

    # --- tuning ---------------------------------------------------------------------------

    def validation_accuracy(self, trained: Trained, bits: int, seed: int) -> float:
        """Accuracy on the validation split of a converted copy of `trained` at `bits`."""
        model = copy.deepcopy(trained.model)
        convert_with_data(model, self.splits, self.config.method_training(
            trained.method, seed, trained.choice), trained.method, bits)
        return evaluate(model, self.splits.val, self.splits, self.config.device)

    def tune(self, name: str, bits: int | None, seed: int, judged_at: list[int]
             ) -> tuple[Trained, dict[str, Any] | None]:
        """The network `name` trains (at `bits`; None: once for every width) and the record
        of how its options were chosen. On the first seed every candidate of the method's
        search space is trained and the best mean validation accuracy over `judged_at` wins
        (the earlier candidate on a tie); later seeds train the choice made there. With
        `tune_bits`, each method is tuned at that width only and every other width trains
        its choice. With
        `tuning_from`, every seed trains the choice made in that file. Never reads the test
        split. Methods not tuned train as configured (record None)."""
        first, tune_bits = self.config.seeds[0], self.config.tune_bits
        if name not in self.config.tuned_methods():
            return self._train_choice(name, {}, bits, seed), None
        if tune_bits is not None:
            judged_at = [tune_bits]
        if self.borrowed is not None:
            choice = self.borrowed[(self.config.base_name(name), judged_at[0])]
            return self._train_choice(name, choice, bits, seed), {
                "choice": choice, "from": self.config.tuning_from}
        if seed != first or (bits is not None and bits != judged_at[0]):
            tuned = self.done.get((name, judged_at[0], first))
            if tuned is None or not tuned.get("tuning"):
                raise ConfigError(f"{name} at {judged_at[0]} bits: no tuned row of seed {first} "
                                  f"in {str(self.out)!r} to take the choice from")
            choice = tuned["tuning"]["choice"]
            return self._train_choice(name, choice, bits, seed), {
                "choice": choice, "seed": first, "bits": judged_at[0]}
        best, best_score, trials = None, -1.0, []
        for choice in self.config.candidates(name):
            trained = self._train_choice(name, choice, bits, seed)
            scores = [self.validation_accuracy(trained, b, seed) for b in judged_at]
            trials.append({"choice": choice, "val_accuracy": scores})
            if statistics.fmean(scores) > best_score:
                best, best_score = trained, statistics.fmean(scores)
        chosen = next(i for i, t in enumerate(trials) if t["choice"] is best.choice)
        return best, {"trials": trials, "chosen": chosen, "choice": best.choice, "seed": first}

    # --- runs -----------------------------------------------------------------------------

    def _run_method(self, name: str, bits_list: list[int], seed: int
                    ) -> Iterator[dict[str, Any]]:
        """The rows of method `name` at `bits_list` for `seed`, each as soon as it is done."""
        cls = self.config.method_class(name)
        start_model = self.pretrained(seed)
        names = select_tensors(start_model)
        before = latent_weights(start_model, names)
        if cls.trains_in_full_precision():  # the reference and post-training quantizers
            model, stats = self._fine_tuned_fp(seed, start_model)
            trained, tuning = Trained(self.config.method(name), model, stats, {}), None
            if not cls.quantizes:
                yield self._fp_row(trained, seed)
                return
        elif cls.post_training:  # one training, converted at every width
            trained, tuning = self.tune(name, None, seed, list(bits_list))
        tune_bits = self.config.tune_bits
        for bits in sorted(bits_list, key=lambda b: b != tune_bits):  # the tuned width first
            if not cls.post_training:  # one training per width
                trained, tuning = self.tune(name, bits, seed, [bits])
            after = latent_weights(trained.model, names)
            yield self._finish(trained, bits, seed, before, after, tuning)

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

    def _base_row(self, trained: Trained, bits: int, seed: int) -> dict[str, Any]:
        c, method = self.config, trained.method
        variant = {"variant_of": c.base_name(method.name)} if method.name in c.variants else {}
        return {"method": method.name, **variant, "bits": bits, "seed": seed, "model": c.model,
                "dataset": c.dataset, "epochs": c.epochs, "pretrain_epochs": c.pretrain_epochs,
                **trained.stats, "recipe": c.recipe(), "config": method.options(),
                "train": as_dict(c.method_training(method, seed, trained.choice)),
                "device": c.device, **provenance()}

    def _fp_row(self, trained: Trained, seed: int) -> dict[str, Any]:
        model = trained.model
        val_accuracy = evaluate(model, self.splits.val, self.splits, self.config.device)
        accuracy = evaluate(model, self.splits.test, self.splits, self.config.device)
        float32_bytes = sum(t.numel() * 4 for t in model.state_dict().values()
                            if t.is_floating_point())
        quantizable = sum(model.get_parameter(n).numel() for n in select_tensors(model))
        row = self._base_row(trained, FP_BITS, seed)
        row.update(accuracy=accuracy, val_accuracy=val_accuracy, bits_per_weight=float(FP_BITS),
                   file_bytes=float32_bytes,
                   stored_bits_per_weight=8 * float32_bytes / quantizable,
                   compression_ratio=1.0)
        return row

    def _finish(self, trained: Trained, bits: int, seed: int, before: dict[str, Tensor],
                after: dict[str, Tensor], tuning: dict[str, Any] | None) -> dict[str, Any]:
        """Convert a copy of the trained network at `bits`, test it (the one read of the
        test split for this row) and weigh it: one result row."""
        method, model = trained.method, copy.deepcopy(trained.model)
        start = time.perf_counter()
        report = convert_with_data(model, self.splits, self.config.method_training(
            method, seed, trained.choice), method, bits)
        quantize_seconds = time.perf_counter() - start
        # the validation split too: choices between rows (a variant for a default) read it
        val_accuracy = evaluate(model, self.splits.val, self.splits, self.config.device)
        accuracy = evaluate(model, self.splits.test, self.splits, self.config.device)
        grids = {t.name: t.codebook.representatives().detach().cpu()
                 for t in quantized_tensors(model)}
        with tempfile.TemporaryDirectory(prefix="qareg-bench-") as folder:
            stored = save_compressed(model, Path(folder) / "model.qz",
                                     meta={"method": method.name, "bits": bits, "seed": seed})
        row = self._base_row(trained, bits, seed)
        row.update(
            accuracy=accuracy,
            val_accuracy=val_accuracy,
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
            sparsity=report.sparsity,
            # per tensor: its k after conversion (a learned width, a budget's allocation)
            layers={t.name: {"k": t.k, "distinct": t.distinct, "zeros": t.zeros}
                    for t in report.tensors},
            histograms=histogram_record(before, after, grids),
            tuning=tuning,
        )
        return row
