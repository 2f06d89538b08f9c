from unittest import mock

import pytest
import torch

from qareg import nearest_cpu, penalty_kernels
from qareg.nearest import assign
from qareg.penalties import VARIANTS, abs_penalty, hard_penalty, soft_penalty, tensor_penalty


def _reference_mean_square(w, scale):
    return w.square().mean().clamp_min((1e-3 * scale).square())


def _reference_hard(weights, representatives, scale):
    """The plain autograd formula that the custom Function replaces."""
    w = weights.flatten()
    nearest = representatives[assign(w, representatives)]  # (N,)
    return (w - nearest).square().mean() / _reference_mean_square(w, scale)


def _reference_abs(weights, representatives, scale):
    w = weights.flatten()
    nearest = representatives[assign(w, representatives)]  # (N,)
    return (w - nearest).abs().mean() / _reference_mean_square(w, scale).sqrt()


FAST_AND_REFERENCE = [(hard_penalty, _reference_hard), (abs_penalty, _reference_abs)]


def setup_tensors(seed=0, n=500, k=4, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, generator=g) * scale).requires_grad_()
    reps = torch.linspace(-2 * scale, 2 * scale, k).requires_grad_()
    return w, reps, torch.tensor(scale)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_reaches_weights_and_representatives(variant):
    w, reps, scale = setup_tensors()
    tensor_penalty(variant, w, reps, scale, 0.05).backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert reps.grad is not None and (reps.grad != 0).all()


def test_hard_penalty_value_and_gradients_match_the_formula():
    w = torch.tensor([0.0, 0.4, 1.2], requires_grad=True)
    reps = torch.tensor([0.0, 1.0], requires_grad=True)
    value = hard_penalty(w, reps, torch.tensor(1.0))
    # nearest: 0, 0, 1 -> squared distances 0, 0.16, 0.04 over the mean square 1.6 / 3
    assert value.item() == pytest.approx(0.2 / 1.6)
    value.backward()
    # each representative is pulled toward its weights: -2 * sum(w - c) / (N * mean square)
    assert torch.allclose(reps.grad, torch.tensor([-0.5, -0.25]))


def test_penalty_gradient_has_no_component_along_a_joint_rescaling():
    """Scale invariance: shrinking weights and representatives together cannot lower it."""
    w, reps, scale = setup_tensors(seed=3)
    hard_penalty(w, reps, scale).backward()
    radial = (w.grad * w.detach()).sum() + (reps.grad * reps.detach()).sum()
    assert abs(radial.item()) < 1e-6 * (w.grad.norm() * w.detach().norm()).item()


def test_all_zero_weights_give_a_finite_penalty():
    w = torch.zeros(10, requires_grad=True)
    value = hard_penalty(w, torch.tensor([-1.0, 1.0]), torch.tensor(1.0))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(w.grad).all()


def test_abs_penalty_is_the_mean_absolute_distance_over_the_rms():
    w = torch.tensor([0.1, 0.45, 2.0], requires_grad=True)
    reps = torch.tensor([0.0, 1.0], requires_grad=True)
    value = abs_penalty(w, reps, torch.tensor(1.0))
    rms = w.detach().square().mean().sqrt().item()
    assert value.item() == pytest.approx((0.1 + 0.45 + 1.0) / 3 / rms, rel=1e-5)
    value.backward()
    # each representative is pulled toward its weights with a force that ignores distance
    assert torch.allclose(reps.grad, torch.tensor([-2.0, -1.0]) / 3 / rms)


def test_soft_penalty_tends_to_hard_at_low_temperature():
    w, reps, scale = setup_tensors(seed=1)
    hard = hard_penalty(w, reps, scale)
    soft = soft_penalty(w, reps, scale, 1e-4)
    assert soft.item() == pytest.approx(hard.item(), rel=1e-2, abs=1e-4)
    assert soft.item() <= hard.item() + 1e-7  # soft-min never exceeds the min


def test_soft_penalty_uses_only_neighbours_and_handles_codebook_edges():
    # With 2 representatives every weight has one neighbour on one side only.
    w = torch.tensor([-5.0, 0.5, 5.0])
    reps = torch.tensor([0.0, 1.0])
    value = soft_penalty(w, reps, torch.tensor(1.0), 1.0)
    assert torch.isfinite(value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_penalties_are_invariant_to_the_tensor_scale(variant):
    """One global lambda suits layers of any weight scale: scaling weights, representatives
    and scale together leaves the term unchanged."""
    w, reps, scale = setup_tensors(seed=2)
    a = tensor_penalty(variant, w, reps, scale, 0.1)
    b = tensor_penalty(variant, w * 1000, reps * 1000, scale * 1000, 0.1)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)


def away_from_midpoints(n, reps, scale, seed, dtype, margin):
    """n random weights, none within `margin` of a midpoint: finite differences stay on one
    side of it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g, dtype=dtype) * scale
    mids = (reps[1:] + reps[:-1]) / 2
    near = (w.unsqueeze(1) - mids).abs().min(1).values < margin
    return w[~near]


@pytest.mark.parametrize("fast, reference", FAST_AND_REFERENCE)
@pytest.mark.parametrize("weight_scale", [0.05, 1e-5])  # 1e-5: mean square under the floor
@pytest.mark.parametrize("table", [False, True])  # the cell table or the binary search
def test_custom_function_passes_gradcheck(fast, reference, weight_scale, table,
                                          kernel_path):
    reps = (torch.linspace(-2, 2, 5, dtype=torch.float64) * weight_scale).requires_grad_()
    w = away_from_midpoints(40, reps.detach(), weight_scale, 0, torch.float64,
                            1e-3 * weight_scale).requires_grad_()
    scale = torch.tensor(0.05)
    with mock.patch.object(nearest_cpu, "GRID_MIN_NUMEL", 1 if table else 1 << 30):
        assert torch.autograd.gradcheck(lambda w, c: fast(w, c, scale), (w, reps),
                                        eps=1e-6 * weight_scale)
        assert torch.allclose(fast(w, reps, scale), reference(w, reps, scale), rtol=1e-12)


@pytest.mark.parametrize("fast, reference", FAST_AND_REFERENCE)
@pytest.mark.parametrize("shape", [(60_001,), (64, 32, 3, 3)])
@pytest.mark.parametrize("chunk", [penalty_kernels.CHUNK, 4096])  # one slice, many slices
def test_custom_function_matches_the_autograd_formula_in_float32(fast, reference, shape,
                                                                  chunk, monkeypatch,
                                                                  kernel_path):
    monkeypatch.setattr(penalty_kernels, "CHUNK", chunk)
    reps0 = torch.linspace(-0.1, 0.12, 16)  # not a k-means fixed point: clear pulls on c
    w0 = away_from_midpoints(int(torch.tensor(shape).prod()) + 2000, reps0, 0.05, 1,
                             torch.float32, 1e-6)[: int(torch.tensor(shape).prod())]
    grads = []
    for f in (fast, reference):
        w = w0.view(shape).clone().requires_grad_()
        reps = reps0.clone().requires_grad_()
        value = f(w, reps, torch.tensor(0.05))
        (3.0 * value).backward()
        grads.append((value.detach(), w.grad, reps.grad))
    (v, gw, gc), (rv, rgw, rgc) = grads
    assert gw.shape == shape
    assert torch.allclose(v, rv, rtol=1e-5)
    assert torch.allclose(gw, rgw, rtol=1e-4, atol=1e-5 * rgw.abs().max().item())
    assert torch.allclose(gc, rgc, rtol=1e-4, atol=1e-5 * rgc.abs().max().item())


def test_custom_function_gradient_for_a_non_contiguous_tensor(kernel_path):
    w = torch.randn(40, 30).t().requires_grad_()  # a transposed view
    reps = torch.linspace(-2, 2, 4, requires_grad=True)
    hard_penalty(w, reps, torch.tensor(1.0)).backward()
    w2 = w.detach().clone().requires_grad_()
    _reference_hard(w2, reps.detach(), torch.tensor(1.0)).backward()
    assert torch.allclose(w.grad, w2.grad, rtol=1e-4, atol=1e-7)
