"""`qareg demo`: full precision vs post-training k-means vs qareg, on Fashion-MNIST.

Trains one full-precision lenet5, then for every k: quantizes a copy after training
(k-means codebooks, batch norm re-estimated), and fine-tunes another copy with qareg at its
defaults (snapped forward passes and the regularizer) before snapping it; each is stored as
a compressed file and weighed. Every number in the table is a test accuracy; every choice
behind the defaults was made on the validation split (see BENCHMARKS.md). About 3 minutes
on 2 CPU cores (166 s on a 2-core AMD EPYC), so that a newcomer sees a result over a coffee.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qareg.compress import save_compressed
from qareg.config import TrainConfig, as_dict
from qareg.data import load_dataset
from qareg.engine import convert_with_data, train
from qareg.errors import ConfigError
from qareg.evaluation import evaluate
from qareg.methods import Method, create_method
from qareg.models import create_model
from qareg.provenance import provenance
from qareg.quantize import prepare, select_tensors
from qareg.validate import check_folder, check_int


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains; the defaults finish within 6 minutes on 2 CPU cores."""

    model: str = "lenet5"  # network trained on Fashion-MNIST
    epochs: int = 6  # full-precision training
    qareg_epochs: int = 3  # fine-tuning with qareg, for each k
    ks: tuple[int, ...] = (2, 4, 16)  # codebook sizes compared
    lam: float = 1.0  # the regularizer's final lambda (linear ramp from 0)
    seed: int = 0  # initialisation, batch order, codebook init
    val_size: int = 5000  # training images held out for validation (choices use it)
    data_dir: str | None = None  # Fashion-MNIST folder; None: $QAREG_DATA or the default
    device: str = "cpu"

    def __post_init__(self) -> None:
        TrainConfig(model=self.model, epochs=self.epochs, seed=self.seed, device=self.device)
        check_int("qareg_epochs", self.qareg_epochs, 1)
        check_int("val_size", self.val_size, 0)
        check_folder("data_dir", self.data_dir)
        if not isinstance(self.ks, (list, tuple)) or not self.ks:
            raise ConfigError(f"ks must be a list of at least one k, got {self.ks!r}")
        for k in self.ks:
            self.qareg(k)  # validates k and lam
        if len(set(self.ks)) != len(self.ks):
            raise ConfigError(f"ks must not repeat a k, got {list(self.ks)!r}")
        object.__setattr__(self, "ks", tuple(self.ks))

    def full_precision(self) -> TrainConfig:
        return TrainConfig(model=self.model, epochs=self.epochs, optimizer="sgd", lr=0.05,
                           seed=self.seed, device=self.device)

    def fine_tuning(self) -> TrainConfig:
        return TrainConfig(model=self.model, epochs=self.qareg_epochs, optimizer="adam",
                           lr=1e-3, seed=self.seed, device=self.device)

    def qareg(self, k: int) -> Method:
        """qareg at its defaults with codebooks of k representatives and this lambda."""
        return create_method("qareg", {"k": k, "lam": self.lam})


def run_demo(config: DemoConfig, progress: bool = True) -> dict[str, Any]:
    """Run the comparison; returns the result as JSON-ready values (accuracies in percent)."""
    start = time.perf_counter()  # the wall time printed: everything, data loading included
    splits = load_dataset("fashion-mnist", config.data_dir, val_size=config.val_size)
    fp_config = config.full_precision()
    torch.manual_seed(config.seed)
    model = create_model(config.model, splits.num_classes, splits.in_channels,
                         splits.input_size).to(config.device)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    smallest = min(select_tensors(model), key=sizes.__getitem__)
    if max(config.ks) > sizes[smallest]:  # fail now, not after training in full precision
        raise ConfigError(f"ks: k={max(config.ks)} is larger than tensor {smallest!r} of "
                          f"{config.model} with {sizes[smallest]} entries; k must be at most that")
    train(model, splits, fp_config, augment=False, progress=progress, description="full precision")
    fp_accuracy = evaluate(model, splits.test, splits, config.device)
    rows = []

    def add_row(method: str, k: int, network: torch.nn.Module, report, folder: str) -> int:
        """Test, compress and weigh `network`; returns the float32 file size for reference."""
        accuracy = evaluate(network, splits.test, splits, config.device)
        stored = save_compressed(network, Path(folder) / f"{method}-k{k}.qz",
                                 meta={"method": method, "k": k, "seed": config.seed})
        rows.append({"method": method, "k": k, "bits_per_weight": report.bits_per_weight,
                     "accuracy": accuracy, "drop": fp_accuracy - accuracy,
                     "file_bytes": stored.file_bytes,
                     "compression_ratio": stored.compression_ratio})
        return stored.float32_bytes

    with tempfile.TemporaryDirectory(prefix="qareg-demo-") as folder:  # files only weighed
        for k in config.ks:
            ptq = prepare(copy.deepcopy(model), k, seed=config.seed)
            fp_bytes = add_row("ptq-kmeans", k, ptq, convert_with_data(ptq, splits, fp_config),
                               folder)
        for k in config.ks:
            method, tuned = config.qareg(k), copy.deepcopy(model)
            method.prepare(tuned, None, config.seed)
            train(tuned, splits, config.fine_tuning(), method, augment=False,
                  progress=progress, description=f"qareg k={k}")
            add_row("qareg", k, tuned, convert_with_data(tuned, splits, fp_config), folder)
    return {
        "full_precision": {"accuracy": fp_accuracy, "file_bytes": fp_bytes},
        "rows": rows,
        "config": as_dict(config),
        "seconds": round(time.perf_counter() - start, 1),
        **provenance(),
    }


def format_table(result: dict[str, Any]) -> str:
    """The demo's result as a text table."""
    header = (f"{'method':<16}{'k':>6}{'bits/weight':>13}{'test acc %':>12}{'drop':>8}"
              f"{'file KB':>10}{'ratio':>8}")
    fp = result["full_precision"]
    lines = [header, "-" * len(header),
             f"{'full precision':<16}{'-':>6}{32:>13}{fp['accuracy']:>12.2f}{'':>8}"
             f"{fp['file_bytes'] / 1000:>10.1f}{1:>8.2f}"]
    for row in result["rows"]:
        lines.append(f"{row['method']:<16}{row['k']:>6}{row['bits_per_weight']:>13.2f}"
                     f"{row['accuracy']:>12.2f}{row['drop']:>8.2f}"
                     f"{row['file_bytes'] / 1000:>10.1f}{row['compression_ratio']:>8.2f}")
    return "\n".join(lines)
