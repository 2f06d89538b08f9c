import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qareg.codebook import MIN_GAP, Codebook
from qareg.nearest import assign


def brute_force_nearest(values, representatives):
    """argmin |v - c| in float64 over an N x k matrix; torch.argmin picks the first minimum."""
    distances = (values.double().unsqueeze(1) - representatives.double().unsqueeze(0)).abs()
    return distances.argmin(dim=1)


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(2, 40),
    n=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
    spread=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]),
)
def test_assign_equals_brute_force_on_random_inputs(k, n, seed, spread):
    g = torch.Generator().manual_seed(seed)
    reps = (torch.randn(k, generator=g) * spread).sort().values
    reps = torch.unique(reps)  # strictly increasing
    values = torch.randn(n, generator=g) * spread * 1.5
    assert torch.equal(assign(values, reps), brute_force_nearest(values, reps))


@settings(max_examples=200, deadline=None)
@given(
    reps=st.lists(st.integers(-1000, 1000), min_size=2, max_size=20, unique=True),
    picks=st.lists(st.integers(0, 10_000), min_size=1, max_size=50),
    scale_exp=st.integers(-20, 20),
)
def test_assign_ties_go_to_the_lower_representative(reps, picks, scale_exp):
    # Integers times a power of two: every midpoint is exactly representable, so values
    # placed on a midpoint are true ties.
    scale = 2.0**scale_exp
    c = torch.tensor(sorted(reps), dtype=torch.float32) * scale
    mids = (c[:-1] + c[1:]) / 2
    pool = torch.cat([mids, c, mids + scale / 4])
    values = pool[torch.tensor(picks) % pool.numel()]
    got = assign(values, c)
    assert torch.equal(got, brute_force_nearest(values, c))
    on_mid = torch.isin(values, mids)
    below = torch.searchsorted(c, values[on_mid]) - 1  # the representative below each tie
    assert torch.equal(got[on_mid], below)


def test_assign_is_exact_where_float32_midpoints_round():
    # 1 and 1 + 2^-23 are neighbours in float32; their midpoint is not a float32 value.
    c = torch.tensor([1.0, 1.0 + 2.0**-23])
    values = torch.tensor([1.0, 1.0 + 2.0**-23])
    assert assign(values, c).tolist() == [0, 1]


def test_assign_bfloat16_values():
    g = torch.Generator().manual_seed(0)
    reps = torch.randn(7, generator=g).sort().values
    values = torch.randn(1000, generator=g).bfloat16()
    assert torch.equal(assign(values, reps), brute_force_nearest(values.float(), reps))


def test_project_sorts_and_keeps_representatives_apart():
    cb = Codebook(5)
    with torch.no_grad():
        cb.normalized.copy_(torch.tensor([0.3, -1.0, 0.3, 0.3, 2.0]))
    cb.project_()
    gaps = cb.normalized[1:] - cb.normalized[:-1]
    assert (gaps >= MIN_GAP * 0.9).all(), gaps
    assert cb.normalized[0].item() == -1.0 and cb.normalized[-1].item() == 2.0


def test_project_keeps_huge_representatives_distinct_in_float32():
    cb = Codebook(3)
    with torch.no_grad():
        cb.normalized.copy_(torch.tensor([5000.0, 5000.0, 5000.0]))
    cb.project_()
    assert (cb.normalized[1:] > cb.normalized[:-1]).all()


def test_project_leaves_ordered_representatives_untouched():
    cb = Codebook(4)
    start = torch.tensor([-2.0, -0.5, 0.25, 3.0])
    with torch.no_grad():
        cb.normalized.copy_(start)
    cb.project_()
    assert torch.equal(cb.normalized.detach(), start)


def test_fit_puts_representatives_in_the_tensor_units():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=g) * 0.02
    cb = Codebook.fit(w, 4, "kmeans-exact")
    reps = cb.representatives().detach()
    assert reps.min() >= w.min() and reps.max() <= w.max()
    assert abs(cb.scale.item() - w.square().mean().sqrt().item()) < 1e-6
    assert cb.bits == 2 and Codebook(3).bits == 2 and Codebook(2).bits == 1


def test_fit_with_fewer_distinct_values_than_k_stays_distinct():
    w = torch.ones(100)  # a freshly initialised batch-norm weight
    cb = Codebook.fit(w, 4, "quantile")
    reps = cb.representatives().detach()
    assert (reps[1:] > reps[:-1]).all()
    assert torch.equal(cb.quantize(w), torch.full_like(w, reps[0].item())) or (
        (cb.quantize(w) - 1).abs().max() < 1e-4
    )
