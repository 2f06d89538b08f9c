import numpy as np
import pytest

from qareg.compress.entropy import empirical_entropy_bytes, range_decode, range_encode


@pytest.mark.parametrize("k", [2, 3, 16, 300])
def test_range_coding_round_trip(k):
    rng = np.random.default_rng(k)
    p = rng.dirichlet(np.ones(k) * 0.5)
    indices = rng.choice(k, 20_000, p=p)
    stream = range_encode(indices, k)
    np.testing.assert_array_equal(range_decode(stream, k, indices.size), indices)


def test_skewed_indices_cost_about_their_entropy():
    rng = np.random.default_rng(0)
    indices = rng.choice(4, 200_000, p=[0.6, 0.25, 0.1, 0.05])
    stream = range_encode(indices, 4)
    entropy = empirical_entropy_bytes(indices, 4)
    assert entropy < 0.8 * 200_000 * 2 / 8  # well below 2 bits per index
    assert entropy <= stream.size <= 1.002 * entropy + 4 * 4 + 16


def test_entropy_of_uniform_and_constant_streams():
    assert empirical_entropy_bytes(np.arange(8).repeat(100), 8) == pytest.approx(800 * 3 / 8)
    assert empirical_entropy_bytes(np.zeros(100, dtype=np.int64), 4) == 0.0


def test_decode_rejects_counts_that_do_not_match():
    stream = range_encode(np.array([0, 1, 1, 0]), 2)
    with pytest.raises(ValueError, match="add up to 4"):
        range_decode(stream, 2, 5)
    with pytest.raises(ValueError, match="4\\*k bytes"):
        range_decode(stream[:5], 2, 4)
