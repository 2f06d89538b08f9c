"""Validation split, channel statistics, root resolution and the dataset registry."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qareg.data import TensorData, list_datasets, load_dataset
from qareg.data.fashion_mnist import FILES, IMAGES_MAGIC, LABELS_MAGIC
from qareg.data.splits import DATA_ENV, channel_stats, resolve_root, split_validation
from qareg.errors import ConfigError, DataError


def write_fashion(folder: Path, n_train: int = 12, n_test: int = 3) -> None:
    """Four tiny Fashion-MNIST idx files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        for name, magic, shape in (
            (FILES[split][0], IMAGES_MAGIC, (n, 28, 28)),
            (FILES[split][1], LABELS_MAGIC, (n,)),
        ):
            raw = struct.pack(f">I{len(shape)}I", magic, *shape) + bytes(int(np.prod(shape)))
            with gzip.open(folder / name, "wb") as f:
                f.write(raw)


def numbered(n: int) -> TensorData:
    """n 1x1 images whose pixel value and label both equal the sample index."""
    values = torch.arange(n)
    return TensorData(values.to(torch.uint8).view(n, 1, 1, 1), values.long())


def test_list_datasets():
    assert list_datasets() == ["cifar10", "fashion-mnist"]


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError, match="cifar10, fashion-mnist"):
        load_dataset("mnist")


def test_split_disjoint_sizes_deterministic():
    data = numbered(100)
    train, val = split_validation(data, 30, seed=3)
    assert (len(train), len(val)) == (70, 30)
    t, v = set(train.labels.tolist()), set(val.labels.tolist())
    assert not t & v and t | v == set(range(100))
    assert torch.equal(train.images.view(-1).long(), train.labels)  # images follow labels
    assert torch.equal(train.labels, train.labels.sort().values)  # original order kept
    again_train, again_val = split_validation(data, 30, seed=3)
    assert torch.equal(again_val.labels, val.labels)
    assert not torch.equal(split_validation(data, 30, seed=4)[1].labels, val.labels)


@pytest.mark.parametrize("val_size", [-1, 100, 101])
def test_split_bad_size(val_size):
    with pytest.raises(ConfigError, match="val_size"):
        split_validation(numbered(100), val_size, seed=0)


def test_split_zero():
    train, val = split_validation(numbered(10), 0, seed=0)
    assert (len(train), len(val)) == (10, 0)


def test_channel_stats_matches_direct():
    images = torch.randint(0, 256, (7, 3, 5, 4), dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = images.double() / 255
    assert mean == pytest.approx(tuple(x.mean(dim=(0, 2, 3)).tolist()))
    assert std == pytest.approx(tuple(x.std(dim=(0, 2, 3), unbiased=False).tolist()))


def test_tensor_data_validates():
    with pytest.raises(ConfigError, match="uint8"):
        TensorData(torch.zeros(2, 1, 3, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match="int64"):
        TensorData(torch.zeros(2, 1, 3, 3, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


def test_resolve_root_order(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert resolve_root(None, "~/x") == Path.home() / "x"
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert resolve_root(None, "~/x") == tmp_path / "env"
    assert resolve_root(tmp_path / "arg", "~/x") == tmp_path / "arg"


def test_env_var_is_used(monkeypatch, tmp_path):
    write_fashion(tmp_path)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    ds = load_dataset("fashion-mnist", val_size=2)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (10, 2, 3)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "empty"))
    with pytest.raises(DataError, match="empty"):
        load_dataset("fashion-mnist", val_size=2)


def test_subfolder_lookup(tmp_path):
    write_fashion(tmp_path / "fashion-mnist")
    ds = load_dataset("fashion-mnist", tmp_path, val_size=2)
    assert len(ds.test) == 3


def test_bad_arguments(tmp_path):
    write_fashion(tmp_path)
    with pytest.raises(ConfigError, match="val_size"):
        load_dataset("fashion-mnist", tmp_path, val_size=12)
    with pytest.raises(ConfigError, match="split_seed"):
        load_dataset("fashion-mnist", tmp_path, split_seed=-1)
