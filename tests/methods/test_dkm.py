import torch

from qareg import assign
from qareg.methods.dkm import dkm_attention, dkm_soft_weights


def setup_tensors(seed=0, n=200, k=4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 3, generator=g, dtype=torch.float64)
    centroids = torch.linspace(-1.5, 1.5, k, dtype=torch.float64)
    return w, centroids


def test_attention_rows_sum_to_one():
    w, c = setup_tensors()
    attention = dkm_attention(w, c, 0.1)
    assert attention.shape == (w.numel(), c.numel())
    assert torch.allclose(attention.sum(1), torch.ones(w.numel(), dtype=w.dtype))
    assert (attention >= 0).all()


def test_low_temperature_gives_the_nearest_centroid():
    w, c = setup_tensors(seed=1)
    hard = c[assign(w, c)]
    soft = dkm_soft_weights(w, c, 1e-5)
    assert soft.shape == w.shape
    # ties excluded: a weight near a midpoint is an even mix at any temperature
    midpoints = (c[1:] + c[:-1]) / 2
    clear = (w.unsqueeze(-1) - midpoints).abs().min(-1).values > 0.02
    assert torch.allclose(soft[clear], hard[clear], atol=1e-9)
    assert not torch.allclose(dkm_soft_weights(w, c, 1.0), hard, atol=1e-2)


def test_gradient_reaches_weights_and_centroids():
    w, c = setup_tensors(seed=2, n=30)
    w.requires_grad_()
    c.requires_grad_()
    dkm_soft_weights(w, c, 0.3).square().sum().backward()
    assert (c.grad != 0).all() and w.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda w, c: dkm_soft_weights(w, c, 0.3), (w, c))
