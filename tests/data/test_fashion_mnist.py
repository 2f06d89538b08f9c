"""Fashion-MNIST idx parsing and loading, on tiny generated files plus the real set if present."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qareg.data import load_dataset
from qareg.data.fashion_mnist import FILES, IMAGES_MAGIC, LABELS_MAGIC, read_idx
from qareg.errors import DataError

REAL_ROOT = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, magic: int, extra: bytes = b"", cut: int = 0) -> None:
    """Write `array` as a gzipped idx file; `extra` bytes are appended, `cut` bytes dropped."""
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes() + extra
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) - cut])


def write_fashion(folder: Path, n_train: int = 20, n_test: int = 6, seed: int = 0) -> dict:
    """Write the four files of a tiny Fashion-MNIST into `folder`; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / FILES[split][0], images, IMAGES_MAGIC)
        write_idx(folder / FILES[split][1], labels, LABELS_MAGIC)
        arrays[split] = (images, labels)
    return arrays


def test_idx_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    labels = np.array([0, 9, 3], dtype=np.uint8)
    write_idx(tmp_path / "im.gz", images, IMAGES_MAGIC)
    write_idx(tmp_path / "lb.gz", labels, LABELS_MAGIC)
    np.testing.assert_array_equal(read_idx(tmp_path / "im.gz", IMAGES_MAGIC), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "lb.gz", LABELS_MAGIC), labels)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"magic": 0x00000802}, "bad magic"),
        ({"cut": 1}, "truncated"),
        ({"cut": 30}, "truncated"),  # cuts into the header's dims
        ({"extra": b"\x00"}, "extra bytes"),
    ],
)
def test_idx_malformed(tmp_path, kwargs, message):
    path = tmp_path / "bad-images.gz"
    write_idx(path, np.zeros((2, 2, 2), np.uint8), kwargs.pop("magic", IMAGES_MAGIC), **kwargs)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path, IMAGES_MAGIC)
    assert str(path) in str(info.value)


def test_idx_not_gzip(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="gzip") as info:
        read_idx(path, IMAGES_MAGIC)
    assert str(path) in str(info.value)


def test_load_tiny(tmp_path):
    arrays = write_fashion(tmp_path)
    ds = load_dataset("fashion-mnist", tmp_path, val_size=5, split_seed=1)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 5, 6)
    assert (ds.num_classes, ds.in_channels, ds.input_size) == (10, 1, 28)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert ds.test.images.shape == (6, 1, 28, 28)
    assert torch.equal(ds.test.images[:, 0], torch.from_numpy(arrays["test"][0]))
    assert torch.equal(ds.test.labels, torch.from_numpy(arrays["test"][1]).long())
    # mean/std are those of the train split only
    x = ds.train.images.double() / 255
    assert ds.mean == pytest.approx((x.mean().item(),))
    assert ds.std == pytest.approx((x.std(unbiased=False).item(),))


def test_count_mismatch_names_files(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / FILES["train"][1], np.zeros(19, np.uint8), LABELS_MAGIC)
    with pytest.raises(DataError, match="counts must agree") as info:
        load_dataset("fashion-mnist", tmp_path, val_size=5)
    assert FILES["train"][1] in str(info.value) and FILES["train"][0] in str(info.value)


def test_label_out_of_range(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / FILES["test"][1], np.full(6, 10, np.uint8), LABELS_MAGIC)
    with pytest.raises(DataError, match="label 10") as info:
        load_dataset("fashion-mnist", tmp_path, val_size=5)
    assert FILES["test"][1] in str(info.value)


def test_wrong_image_size(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / FILES["test"][0], np.zeros((6, 27, 28), np.uint8), IMAGES_MAGIC)
    with pytest.raises(DataError, match="28x28") as info:
        load_dataset("fashion-mnist", tmp_path, val_size=5)
    assert FILES["test"][0] in str(info.value)


def test_missing_folder(tmp_path):
    folder = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", folder)
    message = str(info.value)
    assert str(folder) in message and str(folder / "fashion-mnist") in message
    for pair in FILES.values():
        assert all(name in message for name in pair)


@pytest.mark.skipif(not REAL_ROOT.is_dir(), reason=f"{REAL_ROOT} is absent")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist", REAL_ROOT)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (55000, 5000, 10000)
    assert ds.train.images.shape == (55000, 1, 28, 28)
    assert ds.test.images.shape == (10000, 1, 28, 28)
    assert ds.train.images.dtype == torch.uint8 and ds.test.labels.dtype == torch.int64
    for split in (ds.train, ds.val, ds.test):
        assert split.labels.min() == 0 and split.labels.max() == 9
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
    assert 0.2 < ds.mean[0] < 0.4 and 0.3 < ds.std[0] < 0.4
