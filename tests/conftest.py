"""Shared fixtures: a tiny learnable image dataset, in memory and as Fashion-MNIST files."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

from qareg import nearest_cpu, penalty_cpu
from qareg.data import Augment, DatasetSplits, TensorData
from qareg.data.fashion_mnist import FILES, IMAGES_MAGIC, LABELS_MAGIC

# Property tests draw the same examples on every run (the suite must be deterministic);
# run with --hypothesis-profile=explore for fresh random draws.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", max_examples=2000)
settings.load_profile("ci")


@pytest.fixture(params=["compiled", "torch"])
def kernel_path(request, monkeypatch):
    """Run a test through both paths of the penalty's kernels: the compiled CPU one (split
    into several ranges even on small tensors) and the torch one that other devices take."""
    if request.param == "torch":
        monkeypatch.setattr(penalty_cpu, "supports", lambda weights: False)
    else:
        monkeypatch.setattr(nearest_cpu, "PARALLEL_NUMEL", 1)
    return request.param


def learnable_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 images whose class is where a bright 6x6 square sits, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        images[i, 3 + 12 * row: 9 + 12 * row, 1 + 5 * col: 7 + 5 * col] = 255
    return images, labels


@pytest.fixture(scope="session")
def tiny_splits() -> DatasetSplits:
    """A 10-class 28x28 dataset that a small network learns within an epoch."""

    def tensors(n: int, seed: int) -> TensorData:
        images, labels = learnable_images(n, seed)
        return TensorData(torch.from_numpy(images).unsqueeze(1),
                          torch.from_numpy(labels.astype(np.int64)))

    return DatasetSplits(
        name="fashion-mnist", train=tensors(1024, 0), val=tensors(256, 1), test=tensors(256, 2),
        num_classes=10, in_channels=1, input_size=28, mean=(0.2,), std=(0.3,),
        default_augment=Augment(),
    )


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory) -> Path:
    """A folder holding the four Fashion-MNIST files of a tiny learnable dataset."""
    folder = tmp_path_factory.mktemp("fashion")
    for split, n, seed in (("train", 1200, 0), ("test", 300, 1)):
        images, labels = learnable_images(n, seed)
        for array, magic, name in ((images, IMAGES_MAGIC, FILES[split][0]),
                                   (labels, LABELS_MAGIC, FILES[split][1])):
            header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
            with gzip.open(folder / name, "wb") as f:
                f.write(header + array.tobytes())
    return folder
