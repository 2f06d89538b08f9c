"""One nearest-representative rule: every route through qareg agrees with exact arithmetic,
ties and float edge cases included."""

from fractions import Fraction
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qareg
from qareg import nearest, nearest_cpu, penalty_cpu, penalty_kernels
from qareg.cluster1d import lloyd
from qareg.methods.dkm import DKMQuantizer
from qareg.nearest import assign, midpoints
from qareg.straight_through import SnappedStraightThrough

DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def exact_nearest(values: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
    """The rule in exact rational arithmetic: the nearest representative, ties to the lower;
    -inf to 0, +inf to k - 1."""
    c = [Fraction(float(r)) for r in reps.double()]
    out = []
    for v in values.double().tolist():
        if v in (float("inf"), float("-inf")):
            out.append(0 if v < 0 else len(c) - 1)
            continue
        x = Fraction(v)
        out.append(min(range(len(c)), key=lambda j: (abs(x - c[j]), j)))
    return torch.tensor(out)


def edge_values(reps: torch.Tensor, dtype: torch.dtype, noise: torch.Tensor) -> torch.Tensor:
    """`noise` plus every boundary and its float neighbours (the ties and near-ties), the
    representatives, zeros of both signs, infinities, the extremes and subnormals."""
    b = midpoints(reps.to(dtype), dtype)
    up = torch.nextafter(b, torch.full_like(b, torch.inf))
    down = torch.nextafter(b, torch.full_like(b, -torch.inf))
    info = torch.finfo(dtype)
    specials = torch.tensor([0.0, -0.0, torch.inf, -torch.inf, info.max, -info.max,
                             info.tiny, -info.tiny, info.smallest_normal / 4], dtype=dtype)
    return torch.cat([noise.to(dtype), b, up, down, reps.to(dtype), specials])


def representatives(k: int, seed: int, spread: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    reps = torch.unique((torch.randn(k, generator=g, dtype=torch.float64) * spread).to(dtype))
    return reps if reps.numel() >= 2 else torch.tensor([-spread, spread], dtype=dtype)


def routes(values: torch.Tensor, reps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The index every route of qareg gives each value."""
    out = {}
    with mock.patch.object(nearest, "COMPILED_MIN_NUMEL", 1 << 40):
        out["bucketize"] = assign(values, reps)
    lookups = {"count": {"COUNT_MAX_K": 1 << 8}, "search": {"COUNT_MAX_K": 0},
               "grid": {"COUNT_MAX_K": 0, "GRID_MIN_NUMEL": 0}}
    finite = values[torch.isfinite(values)]  # the penalties sum distances: finite weights
    for lookup, patches in lookups.items():
        with mock.patch.object(nearest, "COMPILED_MIN_NUMEL", 0), \
                mock.patch.multiple(nearest_cpu, **{"GRID_MIN_NUMEL": 1 << 40, **patches}), \
                mock.patch.object(nearest_cpu, "PARALLEL_NUMEL", 1):  # several ranges
            out[f"compiled {lookup}"] = assign(values, reps)
            for power in (1, 2):
                saved = torch.empty(finite.numel(), dtype=torch.int32)
                penalty_cpu.forward_sums(finite.contiguous(), reps, power, saved)
                out[f"penalty compiled p={power} {lookup}"] = saved.long()
    out["penalty torch"] = penalty_kernels._sums_torch(finite, reps, 2)[0].long()
    snapped = SnappedStraightThrough.apply(values, reps)
    out["straight-through"] = torch.tensor([int((reps == s).nonzero()[0]) for s in snapped])
    return out


@settings(max_examples=60, deadline=None)
@given(
    k=st.one_of(st.integers(2, 64), st.integers(65, 300)),
    seed=st.integers(0, 2**31 - 1),
    spread=st.sampled_from([1e-30, 1e-6, 1e-2, 1.0, 1e3, 1e30]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_every_route_agrees_with_exact_arithmetic(k, seed, spread, dtype):
    reps = representatives(k, seed, spread, dtype)
    noise = torch.randn(200, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    values = edge_values(reps, dtype, noise * spread * 1.5)
    expected = exact_nearest(values, reps)
    finite = torch.isfinite(values)
    for name, got in routes(values, reps).items():
        want = expected[finite] if got.numel() == int(finite.sum()) else expected
        assert torch.equal(got, want), (name, values[got != want][:5], reps)


def test_values_on_a_boundary_go_to_the_lower_representative():
    reps = torch.tensor([-1.0, 0.0, 2.0, 3.0])  # midpoints -0.5, 1.0, 2.5: exact in float32
    values = torch.tensor([-0.5, 1.0, 2.5])
    for name, got in routes(values, reps).items():
        assert got.tolist() == [0, 1, 2], name


def test_boundaries_are_rounded_down_where_the_midpoint_is_not_a_float():
    # 1 and 1 + 2^-23 are neighbours in float32; their midpoint is not a float32 value, so
    # its boundary is 1: the value 1 + 2^-23 is above it and nearer the upper one.
    reps = torch.tensor([1.0, 1.0 + 2.0**-23])
    assert midpoints(reps, torch.float32).item() == 1.0
    assert assign(reps, reps).tolist() == [0, 1]


def test_float64_midpoints_are_exact_where_the_sum_rounds():
    # a + b rounds in float64; the boundary must still be the exact midpoint rounded down
    a, b = 1.0, 1.0 + 3 * 2.0**-52
    reps = torch.tensor([a, b], dtype=torch.float64)
    boundary = Fraction(midpoints(reps, torch.float64).item())
    exact = (Fraction(a) + Fraction(b)) / 2
    assert boundary <= exact < Fraction(np.nextafter(float(boundary), 2.0))


def test_the_model_level_routes_agree(tmp_path):
    """convert, compressed files, dkm's snap and Lloyd's clusters use the same rule."""
    torch.manual_seed(0)
    model = qareg.prepare(qareg.create_model("lenet5", 10, 1, 28), k=5, init="quantile")
    expected = {}
    for t in qareg.quantized_tensors(model):
        reps = t.codebook.representatives().detach()
        with torch.no_grad():  # put some weights exactly on the boundaries
            b = midpoints(reps, t.weight.dtype)
            t.weight.view(-1)[: b.numel()] = b
        expected[t.name] = exact_nearest(t.weight.detach().flatten(), reps)
        centroids = type("Centroids", (), {"centroids": lambda self, r=reps: r})()
        values, _ = DKMQuantizer.snap(centroids, t.weight.detach(), 8)
        assert torch.equal(values.flatten(), reps[expected[t.name]]), t.name
        means = lloyd(t.weight.detach(), reps.double(), max_iters=1)
        w = t.weight.detach().double().flatten()
        own = torch.stack([w[expected[t.name] == j].mean() for j in range(reps.numel())])
        assert torch.allclose(means, own.sort().values, rtol=0, atol=1e-12), t.name
    qareg.convert(model)
    qareg.save_compressed(model, tmp_path / "m.qz")
    loaded = qareg.load_compressed(tmp_path / "m.qz")
    for t in qareg.quantized_tensors(model):
        reps = t.codebook.representatives().detach()
        assert torch.equal(t.weight.detach().flatten(), reps[expected[t.name]]), t.name
        assert torch.equal(loaded.get_parameter(t.name), t.weight), t.name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_values_take_the_bucketize_route_and_agree(dtype):
    reps = torch.linspace(-1, 1, 7)
    values = edge_values(reps, dtype, torch.randn(500))
    assert torch.equal(assign(values, reps), exact_nearest(values.double(), reps))
