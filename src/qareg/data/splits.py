"""In-memory datasets, the train/validation/test splits, and where the files are looked for.

Each dataset module (fashion_mnist.py, cifar10.py) registers a `DatasetSpec` whose `read`
returns the official train and test sets; `load_dataset` carves the validation split out of
the official training set and computes the normalisation statistics on what is left.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qareg.data.augment import Augment
from qareg.errors import ConfigError, DataError
from qareg.registry import Registry

DATA_ENV = "QAREG_DATA"  # environment variable naming the data folder when `root` is not given


@dataclass(frozen=True, eq=False)  # eq=False: `==` on tensors is elementwise, not a bool
class TensorData:
    """Images and labels held in memory as tensors."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ConfigError(
                f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} "
                f"of shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or tuple(self.labels.shape) != self.images.shape[:1]:
            raise ConfigError(
                f"labels must be an int64 tensor ({self.images.shape[0]},), got "
                f"{self.labels.dtype} of shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: torch.Tensor) -> TensorData:
        """The samples at `indices` (K,) int64, in that order."""
        return TensorData(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset ready for training: three splits plus what models and loaders need to know."""

    name: str  # "fashion-mnist" or "cifar10"
    train: TensorData  # the official training set minus the validation split
    val: TensorData  # carved from the official training set (choices are made on it)
    test: TensorData  # the official test set (only reports)
    num_classes: int
    in_channels: int
    input_size: int  # images are input_size x input_size pixels
    mean: tuple[float, ...]  # per channel, pixel values scaled to [0, 1], computed on `train`
    std: tuple[float, ...]  # per channel, population std on the same scale
    default_augment: Augment  # the augmentation the usual training recipe uses


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset module registers: how to read it and its fixed properties."""

    name: str
    read: Callable[[Path, bool], tuple[TensorData, TensorData]]  # (root, download) -> train, test
    default_root: str  # folder used when neither `root` nor $QAREG_DATA is given
    num_classes: int
    in_channels: int
    input_size: int
    default_augment: Augment


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add `spec` to the dataset registry under `spec.name`."""
    return DATASETS.register(spec.name)(spec)


def list_datasets() -> list[str]:
    """Names accepted by `load_dataset`, sorted."""
    return DATASETS.names()


def resolve_root(root: str | os.PathLike | None, default: str) -> Path:
    """The data folder: `root` if given, else $QAREG_DATA if set and non-empty, else `default`."""
    if root is not None:
        chosen = root
    elif os.environ.get(DATA_ENV):
        chosen = os.environ[DATA_ENV]
    else:
        chosen = default
    return Path(chosen).expanduser()


def find_files(root: Path, subfolder: str, files: Sequence[str]) -> Path | None:
    """The first of `root` and `root/subfolder` holding all `files`, or None."""
    for folder in (root, root / subfolder):
        if all((folder / name).is_file() for name in files):
            return folder
    return None


def missing_files_error(
    name: str, root: Path, subfolder: str, files: Sequence[str], hint: str = ""
) -> DataError:
    """The error for a dataset whose files are in neither `root` nor `root/subfolder`."""
    absent = "" if root.is_dir() else f" ({root} does not exist or is not a folder)"
    return DataError(
        f"{name} not found: searched {root}{absent} and {root / subfolder} for the files "
        f"{', '.join(files)}. Pass root=... or set ${DATA_ENV} to the folder holding them"
        f" (or its {subfolder}/ subfolder).{' ' + hint if hint else ''}"
    )


def split_validation(data: TensorData, val_size: int, seed: int) -> tuple[TensorData, TensorData]:
    """Carve `val_size` random samples out of `data`: (rest, val), each in the original order."""
    n = len(data)
    if not 0 <= val_size < n:
        raise ConfigError(
            f"val_size={val_size} must be in [0, {n}) for a training set of {n} samples"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (N,)
    val_idx = perm[:val_size].sort().values
    train_idx = perm[val_size:].sort().values
    return data.subset(train_idx), data.subset(val_idx)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 images (N, C, H, W) scaled to [0, 1]."""
    # a 256-bin histogram per channel is exact and avoids a float copy of the whole dataset
    values = torch.arange(256, dtype=torch.float64) / 255  # (256,)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double().cpu()  # (256,)
        mean = (counts * values).sum() / counts.sum()
        var = (counts * (values - mean) ** 2).sum() / counts.sum()
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} must be an int >= {low}")


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    val_size: int = 5000,
    split_seed: int = 0,
) -> DatasetSplits:
    """Load a registered dataset and split it into train / val / test.

    `root` defaults to $QAREG_DATA, then to the dataset's own default folder; the files may
    sit in it directly or in the dataset's standard subfolder. The validation split is
    `val_size` samples of the official training set drawn with `split_seed`.
    """
    spec = DATASETS.get(name)
    _check_int("val_size", val_size, 0)
    _check_int("split_seed", split_seed, 0)
    full_train, test = spec.read(resolve_root(root, spec.default_root), bool(download))
    for split in (full_train, test):
        expected = (spec.in_channels, spec.input_size, spec.input_size)
        assert tuple(split.images.shape[1:]) == expected, (split.images.shape, expected)
    train, val = split_validation(full_train, val_size, split_seed)
    mean, std = channel_stats(train.images)
    return DatasetSplits(
        name=spec.name,
        train=train,
        val=val,
        test=test,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        input_size=spec.input_size,
        mean=mean,
        std=std,
        default_augment=spec.default_augment,
    )
