from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qareg import nearest_cpu, penalty_cpu, penalty_kernels
from qareg.nearest import assign, midpoints


def hard_cases(values, reps):
    """`values` plus every boundary and its float neighbours on both sides: the ties."""
    mids = midpoints(reps, values.dtype)
    up = torch.nextafter(mids, torch.full_like(mids, torch.inf))
    down = torch.nextafter(mids, torch.full_like(mids, -torch.inf))
    return torch.cat([values, mids, up, down, reps.to(values.dtype)])


def test_non_finite_weights_give_a_nan_penalty_not_an_error(kernel_path):
    w = torch.randn(50_000)
    w[[3, 7, 11]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    reps = torch.linspace(-2, 2, 8)
    assert assign(w, reps)[[7, 11]].tolist() == [7, 0]
    value = penalty_kernels.NearestPenalty.apply(w, reps, torch.tensor(1e-6), 2)
    assert torch.isnan(value)


@pytest.mark.parametrize("k, dtype", [(16, torch.uint8), (256, torch.uint8), (257, torch.int16),
                                      (40_000, torch.int32)])
def test_penalty_saves_one_byte_per_weight_up_to_k_256(k, dtype, kernel_path):
    w = torch.randn(50_000, requires_grad=True)
    reps = torch.linspace(-3, 3, k, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = penalty_kernels.NearestPenalty.apply(w, reps, torch.tensor(1e-6), 2)
    big = [t for t in saved if t.numel() == w.numel() and t is not w]
    assert [t.dtype for t in big] == [dtype]  # one small integer per weight
    rest = [t for t in saved if t is not w and t.numel() != w.numel()]  # tables, scalars
    assert sum(t.numel() for t in rest) <= 2 * k + 8
    value.backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(reps.grad).all()


@settings(max_examples=150, deadline=None)
@given(
    k=st.one_of(st.integers(2, nearest_cpu.COUNT_MAX_K), st.integers(2, 300)),
    n=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
    spread=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    grid=st.booleans(),
    power=st.sampled_from([1, 2]),
)
def test_compiled_pass_finds_the_nearest_and_its_sums(k, n, seed, spread, dtype, grid, power):
    g = torch.Generator().manual_seed(seed)
    reps = torch.unique((torch.randn(k, generator=g, dtype=torch.float64) * spread).to(dtype))
    values = hard_cases(torch.randn(n, generator=g, dtype=dtype) * spread * 1.5, reps)
    saved = torch.empty(values.numel(), dtype=torch.int32)
    with (mock.patch.object(nearest_cpu, "GRID_MIN_NUMEL", 1 if grid else 1 << 30),
          mock.patch.object(nearest_cpu, "PARALLEL_NUMEL", 1)):  # several ranges
        pull, sum_square, sum_distance = penalty_cpu.forward_sums(values, reps, power, saved)
    expected = assign(values, reps)
    assert torch.equal(saved.long(), expected)
    d = values.double() - reps.double()[expected]  # exact
    per_weight = d if power == 2 else d.sign()
    # the kernels take d in the weights' dtype, rounded: a relative error of 2^-24 each
    slack = 1e-6 * per_weight.abs().sum().item() + 1e-300
    assert torch.allclose(pull, torch.zeros(reps.numel(), dtype=torch.float64)
                          .index_add_(0, expected, per_weight), rtol=1e-6, atol=slack)
    assert sum_square == pytest.approx(values.double().square().sum().item(), rel=1e-6)
    distance = d.square() if power == 2 else d.abs()
    assert sum_distance == pytest.approx(distance.sum().item(), rel=1e-6, abs=1e-12 * spread)
