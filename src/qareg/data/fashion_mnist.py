"""Fashion-MNIST from its four gzipped idx files.

idx format: a big-endian uint32 magic (0x00000803 for uint8 images with 3 dims, 0x00000801 for
uint8 labels with 1 dim), then one big-endian uint32 per dim, then the uint8 data.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from qareg.data.augment import Augment
from qareg.data.splits import (
    DatasetSpec,
    TensorData,
    find_files,
    missing_files_error,
    register_dataset,
)
from qareg.errors import DataError

IMAGES_MAGIC = 0x00000803  # uint8 data, 3 dims (N, rows, cols)
LABELS_MAGIC = 0x00000801  # uint8 data, 1 dim (N,)
SIZE = 28  # images are SIZE x SIZE, one channel
NUM_CLASSES = 10
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
SUBFOLDER = "fashion-mnist"
FILES = {  # split -> (images file, labels file)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one gzipped idx file whose header must start with `magic`: a uint8 array."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read as a gzip file ({e})") from e
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an idx header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: bad magic number 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header, {len(raw)} bytes, expected {header}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = math.prod(dims)
    if len(raw) - header != size:
        problem = "truncated" if len(raw) - header < size else "extra bytes after the data"
        raise DataError(
            f"{path}: {problem}: {len(raw) - header} data bytes, the header dims {dims} "
            f"need exactly {size}"
        )
    # bytearray: a writable buffer, so torch.from_numpy gets a writable array
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(dims)


def read_split(folder: Path, images_file: str, labels_file: str) -> TensorData:
    """One split from its images and labels files, validated."""
    images = read_idx(folder / images_file, IMAGES_MAGIC)  # (N, 28, 28)
    labels = read_idx(folder / labels_file, LABELS_MAGIC)  # (N,)
    if images.shape[1:] != (SIZE, SIZE):
        raise DataError(
            f"{folder / images_file}: images are {images.shape[1]}x{images.shape[2]}, "
            f"expected {SIZE}x{SIZE}"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(
            f"{folder / labels_file}: label {labels.max()} found, "
            f"expected labels 0..{NUM_CLASSES - 1}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{folder / images_file} holds {len(images)} images but {folder / labels_file} "
            f"holds {len(labels)} labels; the counts must agree"
        )
    return TensorData(
        torch.from_numpy(images)[:, None],  # (N, 1, 28, 28)
        torch.from_numpy(labels).long(),
    )


def read_fashion_mnist(root: Path, download: bool = False) -> tuple[TensorData, TensorData]:
    """The official (train, test) sets from `root` or `root/fashion-mnist/`."""
    files = [name for pair in FILES.values() for name in pair]
    folder = find_files(root, SUBFOLDER, files)
    if folder is None:
        hint = "Fashion-MNIST cannot be downloaded automatically; fetch the files by hand."
        raise missing_files_error("fashion-mnist", root, SUBFOLDER, files, hint if download else "")
    return read_split(folder, *FILES["train"]), read_split(folder, *FILES["test"])


SPEC = register_dataset(
    DatasetSpec(
        name="fashion-mnist",
        read=read_fashion_mnist,
        default_root=DEFAULT_ROOT,
        num_classes=NUM_CLASSES,
        in_channels=1,
        input_size=SIZE,
        default_augment=Augment(),
    )
)
