import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qareg.cluster1d import INITS, initial_representatives, kmeans1d, lloyd, sum_of_squares
from qareg.cluster1d import exact as exact_kmeans
from qareg.errors import ConfigError


@pytest.mark.parametrize("method", INITS)
def test_inits_are_sorted_within_range_and_have_k_entries(method):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5000, generator=g)
    reps = initial_representatives(values, 7, method, torch.Generator().manual_seed(0))
    assert reps.shape == (7,)
    assert (reps[1:] >= reps[:-1]).all()
    assert reps.min() >= values.min() and reps.max() <= values.max()


def test_kmeanspp_is_deterministic_for_a_seed():
    values = torch.randn(2000, generator=torch.Generator().manual_seed(3))
    a = initial_representatives(values, 5, "kmeans++", torch.Generator().manual_seed(7))
    b = initial_representatives(values, 5, "kmeans++", torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_lloyd_reaches_a_fixed_point_where_each_representative_is_its_cluster_mean():
    values = torch.cat([torch.randn(3000) * 0.1 - 2, torch.randn(1000) * 0.3 + 1,
                        torch.rand(2000) * 4 - 2])
    start = initial_representatives(values, 6, "linear")
    reps = lloyd(values, start)
    v = values.double()
    nearest = (v.unsqueeze(1) - reps.unsqueeze(0)).abs().argmin(1)
    for j in range(6):
        members = v[nearest == j]
        if members.numel():
            assert abs(members.mean().item() - reps[j].item()) < 1e-9
    assert sum_of_squares(values, reps) <= sum_of_squares(values, start)


def test_lloyd_finds_well_separated_clusters():
    centres = torch.tensor([-3.0, 0.0, 5.0])
    values = centres.repeat_interleave(100) + torch.randn(300) * 0.01
    reps = initial_representatives(values, 3, "kmeans-exact")
    assert torch.allclose(reps.float(), centres, atol=0.01)


def test_unknown_init_names_the_valid_ones():
    with pytest.raises(ConfigError, match="kmeans\\+\\+"):
        initial_representatives(torch.randn(10), 2, "random")


# ---- exact k-means -----------------------------------------------------------------------

def contiguous_optimum(values, k):
    """Least sum of squares over every cut of the sorted values into k nonempty runs."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    best = np.inf
    for cuts in itertools.combinations(range(1, v.size), k - 1):
        runs = np.split(v, cuts)
        best = min(best, sum(((r - r.mean()) ** 2).sum() for r in runs))
    return best


def dynamic_programme(values, k):
    """The textbook O(k n^2) programme over all sorted values (a k x n table)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    v = v - v.mean()
    s, q = np.concatenate([[0], np.cumsum(v)]), np.concatenate([[0], np.cumsum(v * v)])
    end, start = np.meshgrid(np.arange(v.size + 1), np.arange(v.size + 1), indexing="ij")
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = q[end] - q[start] - (s[end] - s[start]) ** 2 / (end - start)
    cost[start >= end] = np.inf
    best = cost[:, 0]
    for _ in range(k - 1):
        best = np.min(best[None, :] + cost, axis=1)
    return best[-1]


def distinct_count(values):
    return np.unique(np.asarray(values, dtype=np.float64)).size


def assert_optimal(values, reps, optimum):
    assert reps.dtype == torch.float64 and (reps[1:] >= reps[:-1]).all()
    got = sum_of_squares(values, reps)
    assert got <= optimum * (1 + 1e-9) + 1e-12, (got, optimum)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    st.lists(st.integers(-6, 6), min_size=1, max_size=12),
    st.integers(1, 5),
    st.sampled_from([1.0, 0.37, 1e-3, 1e5]),
    st.booleans(),
)
def test_kmeans1d_matches_brute_force_on_small_inputs(ints, k, unit, single):
    values = np.array(ints, dtype=np.float32 if single else np.float64) * unit
    reps = kmeans1d(values, k)
    assert reps.shape == (k,)
    assert_optimal(values, reps, contiguous_optimum(values, min(k, distinct_count(values))))


@pytest.mark.parametrize("first_bits, max_bins", [(None, None), (4, 4), (2, 8), (8, 64)])
def test_kmeans1d_matches_the_textbook_programme_through_many_refinement_rounds(
        monkeypatch, first_bits, max_bins):
    if first_bits is not None:  # coarse bins, few sub-bins: many rounds of bounds and refining
        monkeypatch.setattr(exact_kmeans, "_FIRST_BITS", first_bits)
        monkeypatch.setattr(exact_kmeans, "_MAX_BINS", max_bins)
    rng = np.random.default_rng(first_bits or 0)
    draws = [
        lambda n: (1 + 1e-4 * rng.standard_normal(n)).astype(np.float32),  # one 16-bit bin
        lambda n: 1e6 + rng.standard_normal(n),
        lambda n: np.round(rng.standard_normal(n) * 4) / 3,  # many duplicates
        lambda n: rng.standard_cauchy(n).astype(np.float32),
        lambda n: np.concatenate([rng.standard_normal(n // 2) * 1e-3,
                                  rng.standard_normal(n - n // 2) + 100]),
    ]
    for trial in range(30):
        values = draws[trial % len(draws)](int(rng.integers(20, 150)))
        k = int(rng.integers(2, 7))
        reps = kmeans1d(values, k)
        assert_optimal(values, reps, dynamic_programme(values, min(k, distinct_count(values))))


def test_kmeans1d_is_never_worse_than_lloyd_and_is_a_lloyd_fixed_point():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(150_000, generator=g) * 0.02,
                        torch.randn(50_000, generator=g).abs() * 0.1 + 0.05])  # 200k values
    for k in (2, 16):
        reps = kmeans1d(values, k)
        best = sum_of_squares(values, reps)
        for start in ("linear", "quantile"):
            local = lloyd(values, initial_representatives(values, k, start, g))
            assert best <= sum_of_squares(values, local) * (1 + 1e-12)
        assert torch.allclose(lloyd(values, reps, max_iters=1), reps, rtol=0, atol=1e-12)


def test_kmeans1d_with_fewer_distinct_values_than_k_repeats_the_largest():
    values = torch.tensor([3.0, -1.0, 3.0, 0.5, -1.0, 0.0, -0.0])
    reps = kmeans1d(values, 6)
    assert reps.tolist() == [-1.0, 0.0, 0.5, 3.0, 3.0, 3.0]
    assert kmeans1d(values, 4).tolist() == [-1.0, 0.0, 0.5, 3.0]
    assert kmeans1d(torch.full((5,), 2.5), 3).tolist() == [2.5, 2.5, 2.5]
    assert kmeans1d(torch.tensor([1.0, 2.0]), 5).tolist() == [1.0, 2.0, 2.0, 2.0, 2.0]
    assert sum_of_squares(values, reps) == 0


def test_kmeans1d_of_one_cluster_is_the_mean_and_accepts_any_real_input():
    assert kmeans1d(np.array([1, 2, 6]), 1).tolist() == [3.0]
    values = torch.randn(1000, requires_grad=True)
    expected = kmeans1d(values.detach().double(), 3)
    assert torch.allclose(kmeans1d(values, 3), expected, rtol=1e-6)  # float32 vs float64
    for converted in (values.detach().half(), values.detach().bfloat16(),
                      (values.detach() * 10).long(), (values.detach() * 10).long().numpy()):
        reps = kmeans1d(converted, 3)
        assert reps.shape == (3,) and reps.dtype == torch.float64


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([1.0, float("nan"), 2.0]), "values\\[1\\] is nan"),
    (np.array([1.0, 2.0, -np.inf]), "values\\[2\\] is -inf"),
    (torch.tensor([]), "at least one value"),
])
def test_kmeans1d_rejects_bad_values(bad, message):
    with pytest.raises(ConfigError, match=message):
        kmeans1d(bad, 2)


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "4", None])
def test_kmeans1d_rejects_bad_k(k):
    with pytest.raises(ConfigError, match="k must be an integer >= 1"):
        kmeans1d(torch.randn(10), k)


def test_kmeans1d_refuses_a_k_too_large_for_exact_work_and_the_init_falls_back(monkeypatch):
    monkeypatch.setattr(exact_kmeans, "_MAX_LISTED", 1000)
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="init 'kmeans-lloyd'"):
        kmeans1d(values, 64)
    with pytest.warns(UserWarning, match="falling back to Lloyd's k-means"):
        reps = initial_representatives(values, 64, "kmeans-exact")
    assert torch.equal(reps, initial_representatives(values, 64, "kmeans-lloyd"))


def test_inits_kmeans_is_exact_and_lloyd_is_the_local_search_from_quantiles():
    values = torch.randn(3000, generator=torch.Generator().manual_seed(2))
    assert torch.equal(initial_representatives(values, 5, "kmeans-exact"), kmeans1d(values, 5))
    assert torch.equal(initial_representatives(values, 5, "kmeans-lloyd"),
                       lloyd(values, initial_representatives(values, 5, "quantile")))


def test_sum_of_squares_uses_the_nearest_representative():
    values = torch.tensor([0.0, 1.0, 4.0, 10.0])
    assert sum_of_squares(values, torch.tensor([0.0, 5.0])) == 0 + 1 + 1 + 25
