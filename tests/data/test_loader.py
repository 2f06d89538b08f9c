"""BatchLoader: epoch coverage, determinism, drop_last, normalisation, augmentation."""

import pytest
import torch

from qareg.data import Augment, BatchLoader, TensorData
from qareg.errors import ConfigError


def numbered(n: int, c: int = 1, size: int = 4) -> TensorData:
    """n images whose label is the sample index; image i is filled with i % 256."""
    values = torch.arange(n)
    images = (values % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, c, size, size).clone()
    return TensorData(images, values.long())


def epoch_labels(loader: BatchLoader) -> torch.Tensor:
    return torch.cat([y for _, y in loader])


@pytest.mark.parametrize("shuffle", [False, True])
def test_epoch_covers_every_sample_once(shuffle):
    loader = BatchLoader(numbered(103), 10, (0.0,), (1.0,), shuffle=shuffle)
    assert len(loader) == 11
    batches = list(loader)
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == list(range(103))
    assert torch.equal(labels, torch.arange(103)) != shuffle
    for x, y in batches:  # images stay paired with their labels
        assert x.shape == (len(y), 1, 4, 4) and x.dtype == torch.float32
        assert torch.allclose(x[:, 0, 0, 0], y.float() / 255)


def test_deterministic_and_epochs_differ():
    make = lambda seed: BatchLoader(numbered(50), 7, (0.0,), (1.0,), shuffle=True, seed=seed)  # noqa: E731
    a, b = make(0), make(0)
    a1, a2 = epoch_labels(a), epoch_labels(a)
    assert torch.equal(a1, epoch_labels(b)) and torch.equal(a2, epoch_labels(b))
    assert not torch.equal(a1, a2)
    assert not torch.equal(a1, epoch_labels(make(1)))


def test_generator_state_defines_next_epoch():
    a = BatchLoader(numbered(30), 4, (0.0,), (1.0,), shuffle=True, augment=Augment(1, True))
    b = BatchLoader(numbered(30), 4, (0.0,), (1.0,), shuffle=True, augment=Augment(1, True))
    next(iter(a))  # a partly consumed epoch still draws the whole epoch's randomness
    b.generator.set_state(a.generator.get_state())
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_drop_last():
    loader = BatchLoader(numbered(23), 5, (0.0,), (1.0,), shuffle=True, drop_last=True)
    assert len(loader) == 4
    labels = epoch_labels(loader)
    assert [len(y) for _, y in loader] == [5] * 4
    assert len(set(labels.tolist())) == 20
    assert len(BatchLoader(numbered(3), 5, (0.0,), (1.0,), shuffle=False, drop_last=True)) == 0


def test_normalisation_values():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 2, 1, 1)
    data = TensorData(images.clone(), torch.zeros(3, dtype=torch.long))
    x, _ = next(iter(BatchLoader(data, 3, (0.5, 0.1), (0.25, 2.0), shuffle=False)))
    v = torch.tensor([0.0, 0.2, 1.0])
    assert torch.allclose(x[:, 0, 0, 0], (v - 0.5) / 0.25)
    assert torch.allclose(x[:, 1, 0, 0], (v - 0.1) / 2.0)


def test_augmented_batches_are_windows_and_flips():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (40, 3, 5, 5), generator=gen).to(torch.uint8)
    data = TensorData(images, torch.arange(40))
    loader = BatchLoader(data, 16, (0.0,) * 3, (1.0,) * 3, shuffle=True, augment=Augment(1, True))
    n_flipped = 0
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    for x, y in loader:
        raw = (x * 255).round().to(torch.uint8)
        for img, i in zip(raw, y.tolist(), strict=True):
            windows = [padded[i, :, dy : dy + 5, dx : dx + 5] for dy in range(3) for dx in range(3)]
            plain = any(torch.equal(img, w) for w in windows)
            flipped = any(torch.equal(img, w.flip(-1)) for w in windows)
            assert plain or flipped
            n_flipped += flipped
    assert 5 < n_flipped < 35


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.0}, "batch_size"),
        ({"mean": (0.0, 0.0)}, "per channel"),
        ({"std": (0.0,)}, "std"),
        ({"augment": "flip"}, "augment"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"batch_size": 2, "mean": (0.0,), "std": (1.0,), **kwargs}
    with pytest.raises(ConfigError, match=message):
        BatchLoader(numbered(4), args.pop("batch_size"), shuffle=True, **args)
