"""Batch random crops and flips."""

import pytest
import torch
import torch.nn.functional as F

from qareg.data import Augment, random_crop, random_flip
from qareg.errors import ConfigError


def images(n: int, c: int = 3, h: int = 6, w: int = 5) -> torch.Tensor:
    return torch.randint(1, 256, (n, c, h, w), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )


@pytest.mark.parametrize("padding", [1, 2, 7])
def test_random_crop_is_shifted_window(padding):
    x = images(64)
    out = random_crop(x, padding, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (padding,) * 4)
    h, w = x.shape[-2:]
    offsets = set()
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w])
        ]
        assert found, f"image {i} is no window of its padded input"
        offsets.add(found[0])
    assert len(offsets) > 1  # offsets differ between samples


def test_random_crop_zero_padding_and_determinism():
    x = images(8)
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)
    a = random_crop(x, 2, torch.Generator().manual_seed(5))
    b = random_crop(x, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="padding"):
        random_crop(x, -1, torch.Generator())


def test_random_flip():
    x = images(1000, c=1, h=2, w=3)
    out = random_flip(x, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all()
    assert not (same & flipped).any()  # random images are asymmetric: each case is clear-cut
    assert 400 < int(flipped.sum()) < 600


def test_augment_validates():
    assert Augment() == Augment(0, False)
    with pytest.raises(ConfigError, match="crop_padding"):
        Augment(crop_padding=-1)
    with pytest.raises(ConfigError, match="flip"):
        Augment(flip=1)
