"""CIFAR-10 batch reading, refusal of unsafe pickles, and the checked download."""

import builtins
import hashlib
import os
import pickle
import struct
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from qareg.data import load_dataset
from qareg.data.cifar10 import FILES, SUBFOLDER, download_cifar10, read_batch
from qareg.errors import DataError


def py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """`{"data": data, "labels": labels}` pickled as Python 2 wrote the real batch files.

    Python 3 cannot write Python-2 `str` (SHORT_BINSTRING) objects, so the opcodes are
    assembled by hand: GLOBAL numpy.core.multiarray._reconstruct, REDUCE, BUILD, as in the
    official files.
    """

    def s(b: bytes) -> bytes:  # a Python-2 str
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v: int) -> bytes:  # a small int
        return b"K" + bytes([v]) if v < 256 else b"J" + struct.pack("<i", v)

    n, d = data.shape
    dtype = b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"  # dtype("u1", 0, 1)
    dtype += b"(" + i(3) + s(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + i(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
    array += i(0) + b"\x85" + s(b"b") + b"\x87R"  # _reconstruct(ndarray, (0,), "b")
    array += b"(" + i(1) + i(n) + i(d) + b"\x86" + dtype + b"\x89" + s(data.tobytes()) + b"tb"
    labels_list = b"](" + b"".join(i(y) for y in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + labels_list + b"u."


def batch_bytes(n: int, seed: int) -> tuple[bytes, np.ndarray, list[int]]:
    """A batch of n random images pickled in the layout of the real (Python 2) files."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(y) for y in rng.integers(0, 10, n)]
    return py2_pickle(data, labels), data, labels


def write_cifar(folder: Path, n: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write all six batch files (n images each) into `folder`; returns their contents."""
    folder.mkdir(parents=True, exist_ok=True)
    contents = {}
    for i, name in enumerate(FILES):
        raw, data, labels = batch_bytes(n, seed=i)
        (folder / name).write_bytes(raw)
        contents[name] = (data, labels)
    return contents


def make_archive(tmp_path: Path) -> tuple[Path, str]:
    """A small cifar-10-python.tar.gz in the real layout; returns (path, md5)."""
    write_cifar(tmp_path / "src" / SUBFOLDER)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / SUBFOLDER, arcname=SUBFOLDER)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


class Evil:
    def __init__(self, marker: Path, use_eval: bool) -> None:
        self.marker, self.use_eval = marker, use_eval

    def __reduce__(self):
        if self.use_eval:
            return builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",)
        return os.system, (f"touch {self.marker}",)


def test_read_batch(tmp_path):
    raw, data, labels = batch_bytes(5, seed=0)
    (tmp_path / "b").write_bytes(raw)
    images, ys = read_batch(tmp_path / "b")
    assert images.shape == (5, 3, 32, 32) and images.dtype == np.uint8
    # channel-major: the first 1024 values are the red plane, row by row
    np.testing.assert_array_equal(images[:, 0].reshape(5, -1), data[:, :1024])
    np.testing.assert_array_equal(images[:, 2, 31], data[:, -32:])
    assert ys.tolist() == labels and ys.dtype == np.int64


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_read_python3_pickle(tmp_path, protocol):
    data = np.arange(2 * 3072).reshape(2, 3072).astype(np.uint8)
    (tmp_path / "b").write_bytes(pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol))
    if protocol == 2:  # Python 3 writes bytes in protocol 2 via _codecs.encode: refused
        with pytest.raises(DataError, match="_codecs.encode"):
            read_batch(tmp_path / "b")
        return
    images, labels = read_batch(tmp_path / "b")
    assert np.array_equal(images.reshape(2, -1), data) and labels.tolist() == [3, 4]


def test_load_dataset(tmp_path):
    contents = write_cifar(tmp_path / SUBFOLDER)
    ds = load_dataset("cifar10", tmp_path, val_size=6)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (14, 6, 4)
    assert (ds.num_classes, ds.in_channels, ds.input_size) == (10, 3, 32)
    assert ds.train.images.shape == (14, 3, 32, 32) and ds.train.labels.dtype == torch.int64
    test_data, test_labels = contents["test_batch"]
    assert torch.equal(ds.test.images.reshape(4, -1), torch.from_numpy(test_data))
    assert ds.test.labels.tolist() == test_labels
    assert len(ds.mean) == len(ds.std) == 3
    assert (ds.default_augment.crop_padding, ds.default_augment.flip) == (4, True)


def test_flat_folder(tmp_path):
    write_cifar(tmp_path)
    assert len(load_dataset("cifar10", tmp_path, val_size=1).test) == 4


def test_missing_mentions_download(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and str(tmp_path / SUBFOLDER) in message
    assert all(name in message for name in FILES)
    assert "download=True" in message and "--download" in message


@pytest.mark.parametrize("use_eval", [False, True])
def test_malicious_pickle_refused(tmp_path, use_eval):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil(marker, use_eval), b"labels": []}, 4))
    global_name = "builtins.eval" if use_eval else f"{os.system.__module__}.system"
    with pytest.raises(DataError, match=f"refusing to unpickle the global {global_name}") as info:
        read_batch(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([1, 2], "dict"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "3072"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels range"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, "list of ints"),
    ],
)
def test_malformed_batch(tmp_path, obj, message):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(obj, 4))
    with pytest.raises(DataError, match=message) as info:
        read_batch(path)
    assert str(path) in str(info.value)


def test_corrupt_pickle(tmp_path):
    path = tmp_path / "data_batch_3"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, 4)[:-20])
    with pytest.raises(DataError) as info:
        read_batch(path)
    assert str(path) in str(info.value)


def test_download_file_url(tmp_path):
    archive, md5 = make_archive(tmp_path)
    root = tmp_path / "root"
    folder = download_cifar10(root, url=archive.as_uri(), md5=md5)
    assert folder == root / SUBFOLDER
    assert sorted(p.name for p in root.iterdir()) == [SUBFOLDER]  # no leftovers
    for name in FILES:
        assert (folder / name).read_bytes() == (tmp_path / "src" / SUBFOLDER / name).read_bytes()
    assert len(load_dataset("cifar10", root, val_size=2).test) == 4


def test_download_checksum_mismatch(tmp_path):
    archive, md5 = make_archive(tmp_path)
    root = tmp_path / "root"
    with pytest.raises(DataError, match="checksum") as info:
        download_cifar10(root, url=archive.as_uri(), md5="0" * 32)
    assert "0" * 32 in str(info.value) and md5 in str(info.value)
    assert list(root.iterdir()) == []


def test_download_skipped_when_complete(tmp_path, monkeypatch):
    write_cifar(tmp_path / SUBFOLDER)

    def no_network(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    ds = load_dataset("cifar10", tmp_path, download=True, val_size=2)
    assert len(ds.test) == 4


def test_download_refuses_escaping_member(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    (tmp_path / "payload").write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(tmp_path / "payload", arcname="../escaped")
    md5 = hashlib.md5(evil.read_bytes()).hexdigest()
    root = tmp_path / "a" / "root"
    with pytest.raises(DataError, match="refusing"):
        download_cifar10(root, url=evil.as_uri(), md5=md5)
    assert not (tmp_path / "a" / "escaped").exists()
    assert list(root.iterdir()) == []


def test_download_unreachable(tmp_path):
    root = tmp_path / "root"
    with pytest.raises(DataError, match="cannot download"):
        download_cifar10(root, url=(tmp_path / "absent.tar.gz").as_uri(), md5="0" * 32)
    assert list(root.iterdir()) == []
