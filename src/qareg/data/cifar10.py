"""CIFAR-10 from the standard python folder `cifar-10-batches-py`, with a safe download.

Each batch file is a pickled dict (a Python-2 pickle) holding `b"data"`, a uint8 array
(n, 3072) of channel-major RGB 32x32 images, and `b"labels"`, a list of n ints. Pickles can run
arbitrary code, so `SafeUnpickler` only resolves the numpy globals needed to rebuild arrays.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
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

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
SUBFOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
FILES = (*TRAIN_FILES, TEST_FILE)
DEFAULT_ROOT = "~/.cache/qareg"
SIZE = 32
NUM_CLASSES = 10

try:  # numpy >= 2 moved the pickle helpers; both module names appear in existing files
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

_ALLOWED = {  # (module, name) -> object: everything an ndarray / dtype pickle refers to
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # protocols 0-4 (the real files)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # protocol 5, i.e. re-pickled files
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the numpy globals in `_ALLOWED`."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # Python-2 str -> bytes (keys b"data")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED:
            raise DataError(
                f"{self.path}: refusing to unpickle the global {module}.{name}; a CIFAR-10 batch "
                f"may only refer to {', '.join(f'{m}.{n}' for m, n in _ALLOWED)}"
            )
        return _ALLOWED[module, name]


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: images (n, 3, 32, 32) uint8 and labels (n,) int64, validated."""
    try:
        with open(path, "rb") as f:
            batch = SafeUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise DataError(f"{path}: not a readable CIFAR-10 batch pickle ({e!r})") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f'{path}: expected a dict with keys b"data" and b"labels"')
    data, labels = batch[b"data"], batch[b"labels"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or (data.shape[1] != 3 * SIZE * SIZE)
    ):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f'{path}: b"data" is {desc}, expected a uint8 array (n, 3072)')
    if not isinstance(labels, (list, tuple, np.ndarray)) or not all(
        isinstance(y, (int, np.integer)) and not isinstance(y, bool) for y in labels
    ):
        raise DataError(f'{path}: b"labels" must be a list of ints')
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(
            f"{path}: labels range {labels.min()}..{labels.max()}, expected 0..{NUM_CLASSES - 1}"
        )
    return data.reshape(-1, 3, SIZE, SIZE), labels  # channel-major rows: (n, 3, 32, 32)


def read_batches(folder: Path, names: tuple[str, ...]) -> TensorData:
    """Concatenate the batch files `names` in `folder`."""
    parts = [read_batch(folder / name) for name in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return TensorData(torch.from_numpy(images), torch.from_numpy(labels))


def _download_to(url: str, dest: Path) -> str:
    """Stream `url` into the file `dest`; returns the md5 hex digest of what was written."""
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url) as response, open(dest, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except OSError as e:  # urllib.error.URLError is an OSError
        raise DataError(f"cannot download {url} ({e}); fetch it by hand into {dest.parent}") from e
    return digest.hexdigest()


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract the tar.gz `archive` into `dest`, refusing links and paths outside `dest`."""
    base = dest.resolve()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                target = (base / m.name).resolve()
                if (
                    not (m.isfile() or m.isdir())
                    or os.path.isabs(m.name)
                    or (target != base and base not in target.parents)
                ):
                    raise DataError(f"{archive}: refusing the archive member {m.name!r}")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                tar.extractall(base, members=members, filter="data")
            else:  # pragma: no cover - members were checked above
                tar.extractall(base, members=members)
    except tarfile.TarError as e:
        raise DataError(f"{archive}: not a valid tar.gz archive ({e})") from e


def download_cifar10(root: str | os.PathLike, *, url: str = URL, md5: str = MD5) -> Path:
    """Fetch and extract CIFAR-10 into `root/cifar-10-batches-py/` unless already complete.

    Returns the folder holding the batch files. The archive goes to a temporary file in
    `root`, is checked against `md5` and removed after extraction.
    """
    root = Path(root).expanduser()
    folder = find_files(root, SUBFOLDER, FILES)
    if folder is not None:
        return folder
    root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=root, prefix=".cifar-10-python.", suffix=".tar.gz.part")
    os.close(fd)
    archive = Path(name)
    try:
        actual = _download_to(url, archive)
        if actual != md5:
            raise DataError(
                f"checksum mismatch for {url}: expected md5 {md5}, got {actual}; "
                "the download was deleted"
            )
        # extract next to root, then move the files in: a failure leaves no half folder
        with tempfile.TemporaryDirectory(dir=root, prefix=".cifar-10-extract.") as tmp:
            _safe_extract(archive, Path(tmp))
            extracted = Path(tmp) / SUBFOLDER
            missing = [f for f in FILES if not (extracted / f).is_file()]
            if missing:
                raise DataError(f"{url}: the archive lacks {SUBFOLDER}/{', '.join(missing)}")
            (root / SUBFOLDER).mkdir(exist_ok=True)
            for item in extracted.iterdir():
                os.replace(item, root / SUBFOLDER / item.name)
    finally:
        archive.unlink(missing_ok=True)
    return root / SUBFOLDER


def read_cifar10(root: Path, download: bool = False) -> tuple[TensorData, TensorData]:
    """The official (train, test) sets from `root` or `root/cifar-10-batches-py/`."""
    if download:
        folder = download_cifar10(root)
    else:
        folder = find_files(root, SUBFOLDER, FILES)
    if folder is None:
        hint = f"Pass download=True (CLI: --download) to fetch {URL} (about 163 MB) into {root}."
        raise missing_files_error("cifar10", root, SUBFOLDER, FILES, hint)
    return read_batches(folder, TRAIN_FILES), read_batches(folder, (TEST_FILE,))


SPEC = register_dataset(
    DatasetSpec(
        name="cifar10",
        read=read_cifar10,
        default_root=DEFAULT_ROOT,
        num_classes=NUM_CLASSES,
        in_channels=3,
        input_size=SIZE,
        default_augment=Augment(crop_padding=4, flip=True),
    )
)
