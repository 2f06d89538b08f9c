"""The rate term: a differentiable estimate of the range coder's bits per weight."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qareg.compress.entropy import empirical_entropy_bytes
from qareg.nearest import assign
from qareg.rate import model_rate_bits, rate_bits, sampled, soft_usage


def skewed_weights(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, generator=g) * 0.02, torch.randn(n // 4, generator=g)])


@pytest.mark.parametrize("k", [2, 3, 4, 16])
def test_at_low_temperature_the_rate_is_the_hard_assignments_entropy(k):
    w = skewed_weights(4000, k)
    c = torch.linspace(-1.5, 1.5, k)
    hard = empirical_entropy_bytes(assign(w, c).numpy(), k) * 8 / w.numel()
    assert rate_bits(w, c, 1.0, temperature=1e-6).item() == pytest.approx(hard, abs=1e-4)


@settings(max_examples=100, deadline=None)
@given(k=st.integers(2, 12), seed=st.integers(0, 1000),
       temperature=st.floats(1e-4, 10.0))
def test_usage_is_a_distribution_and_the_rate_lies_in_0_to_log2_k(k, seed, temperature):
    w = skewed_weights(300, seed)
    c = torch.sort(torch.randn(k, generator=torch.Generator().manual_seed(seed))).values
    usage = soft_usage(w, c, 1.0, temperature)
    assert torch.all(usage >= 0) and usage.sum().item() == pytest.approx(1.0, abs=1e-5)
    bits = rate_bits(w, c, 1.0, temperature).item()
    assert -1e-6 <= bits <= math.log2(k) + 1e-5


def test_descending_the_rate_lowers_the_coded_size():
    """Gradient steps on the rate alone skew the usage: the hard entropy falls."""
    w = skewed_weights(2000, 0).requires_grad_()
    c = torch.tensor([-1.0, -0.1, 0.1, 1.0])
    before = empirical_entropy_bytes(assign(w.detach(), c).numpy(), 4)
    optimizer = torch.optim.SGD([w], lr=0.5)
    for _ in range(50):
        optimizer.zero_grad()
        (rate_bits(w, c, 1.0, temperature=0.05) * w.numel()).backward()
        optimizer.step()
    after = empirical_entropy_bytes(assign(w.detach(), c).numpy(), 4)
    assert after < 0.9 * before
    assert np.isfinite(after)


def test_qareg_adds_the_weighted_rate_to_its_regularizer():
    import qareg
    from qareg.methods import create_method
    from qareg.methods.base import Progress
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    plain, rated = (create_method("qareg", {"rate": r, "rate_temperature": 0.1})
                    for r in (0.0, 2.5))
    plain.prepare(model, 2, seed=0)
    rated.prepare(model, 2, seed=0)  # keeps the codebooks the model has
    progress = Progress(step=0, total_steps=1, epoch=1, epochs=1)
    tensors = qareg.quantize.quantized_tensors(model)
    expected = plain.regularizer(model, torch.tensor(0.0), progress) + 2.5 * model_rate_bits(
        tensors, 0.1)
    assert rated.regularizer(model, torch.tensor(0.0), progress).item() == pytest.approx(
        expected.item(), rel=1e-6)
    with pytest.raises(qareg.errors.ConfigError, match="rate_temperature"):
        create_method("qareg", {"rate": 1.0, "rate_temperature": 0.0})


@pytest.mark.parametrize("k", [2, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_compiled_rate_matches_the_torch_one_values_and_gradients(k, dtype):
    from qareg.rate import torch_rate_bits
    from qareg.rate_cpu import compiled_rate_bits

    g = torch.Generator().manual_seed(k)
    base = (torch.randn(70_000, generator=g) * 0.3).to(dtype)  # parallel passes too
    reps = torch.sort(torch.randn(k, generator=g)).values.to(dtype)
    scale, temperature = 0.7, 0.05
    results = []
    for rate in (torch_rate_bits, compiled_rate_bits):
        w, c = base.clone().requires_grad_(), reps.clone().requires_grad_()
        bits = rate(w, c, scale, temperature)
        (2.5 * bits).backward()
        results.append((bits.detach(), w.grad, c.grad))
    # float64: the same to rounding; float32: torch sums in float32, the passes in float64
    rtol, atol = (1e-3, 1e-5) if dtype == torch.float32 else (1e-9, 1e-12)
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol)


def test_a_sample_reads_every_weight_once_in_stride_steps_and_small_tensors_whole():
    w = torch.arange(1000.0)
    assert torch.equal(sampled(w, 0, 3), w) and torch.equal(sampled(w, 1000, 3), w)
    seen = torch.cat([sampled(w, 300, step) for step in range(4)])  # stride ceil(1000/300)
    assert torch.equal(seen.sort().values, w)
    assert torch.equal(sampled(w, 300, 4), sampled(w, 300, 0))  # the offset turns


def test_the_sampled_rate_estimates_the_full_one_and_its_gradient_over_a_cycle():
    import qareg

    model = torch.nn.Sequential(torch.nn.Linear(400, 500))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # skewed, as trained weights are: most near zero
        model[0].weight.copy_(torch.randn(500, 400, generator=g)
                              * torch.rand(500, 400, generator=g) ** 3)
    qareg.prepare(model, 4, init="quantile")
    tensors = qareg.quantize.quantized_tensors(model)
    weight = tensors[0].weight  # 200,000 weights: 1 in 13 read at a sample of 2^14
    full = model_rate_bits(tensors, 0.05)
    full.backward()
    expected, weight.grad = weight.grad.clone(), None
    stride, estimates = 13, []
    for step in range(stride):
        bits = model_rate_bits(tensors, 0.05, sample=1 << 14, step=step)
        bits.backward()  # gradients add up over the cycle
        estimates.append(bits.item())
    assert all(abs(bits - full.item()) <= 0.02 for bits in estimates)  # of 1.95 bits
    summed = weight.grad / stride  # each weight's gradient once, s times larger
    error = torch.linalg.vector_norm(summed - expected) / torch.linalg.vector_norm(expected)
    assert error <= 0.1  # the subsets' usage differs from the whole's by sampling noise
