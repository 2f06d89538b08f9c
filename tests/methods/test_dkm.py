import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import qareg
from qareg import assign, engine
from qareg.cluster1d import initial_representatives
from qareg.config import TrainConfig
from qareg.errors import ConfigError
from qareg.methods.dkm import (
    DKMConfig,
    DKMMethod,
    DKMQuantizer,
    dkm_attention,
    dkm_soft_weights,
)
from qareg.methods.parametrized import find_parametrizations


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


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def prepared(bits=2, config=None, seed=0):
    model = small_net(seed)
    method = DKMMethod(config)
    method.prepare(model, bits, seed=seed)
    return model, method, find_parametrizations(model, DKMQuantizer)


def test_method_forward_is_the_soft_weights_of_the_latent_weights():
    model, _, found = prepared(bits=2)
    assert list(found) == ["0.weight", "3.weight"]
    for module, quantizer in found.values():
        latent = module.parametrizations.weight.original
        expected = dkm_soft_weights(latent, quantizer.centroids(), quantizer.temperature)
        assert torch.equal(module.weight, expected)
        assert not torch.equal(module.weight, latent)


def test_centroids_start_at_kmeans_and_receive_gradient():
    model, method, found = prepared(bits=2)
    for module, quantizer in found.values():
        latent = module.parametrizations.weight.original
        start = initial_representatives(latent.detach(), 4, "kmeans-exact").float()
        assert torch.allclose(quantizer.centroids(), start, rtol=1e-5, atol=1e-7)
    centroids = method.param_groups(model)[0]["params"]
    assert [id(p) for p in centroids] == [id(q.codebook.normalized) for _, q in found.values()]
    model(torch.randn(3, 1, 8, 8)).square().sum().backward()
    for p in centroids:
        assert p.grad is not None and (p.grad != 0).all()
    latent = found["0.weight"][0].parametrizations.weight.original
    assert latent.grad.abs().sum() > 0  # the weights learn through the attention too


def test_temperature_follows_the_scale_of_the_tensor():
    w = torch.randn(300, generator=torch.Generator().manual_seed(3)) * 0.05
    small = DKMQuantizer(w, 2, DKMConfig(tau=0.3))
    large = DKMQuantizer(w * 10, 2, DKMConfig(tau=0.3))
    gaps = small.centroids().detach().double().diff()
    assert small.temperature.item() == pytest.approx(0.3 * gaps.square().mean().item(), rel=1e-5)
    assert large.temperature.item() == pytest.approx(100 * small.temperature.item(), rel=1e-4)
    assert torch.allclose(large(w * 10), 10 * small(w), rtol=1e-4, atol=1e-6)  # same softness


def test_no_more_centroids_than_weights():
    quantizer = DKMQuantizer(torch.randn(20), 8, DKMConfig(tau=0.3))
    assert quantizer.centroids().numel() == 20


def test_finalize_snaps_each_weight_to_its_nearest_centroid():
    model, method, found = prepared(bits=3)
    latent = {n: m.parametrizations.weight.original.detach().clone() for n, (m, _) in found.items()}
    centroids = {n: q.centroids().detach().clone() for n, (_, q) in found.items()}
    grids = method.finalize(model, 3)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for name, grid in grids.items():
        assert torch.equal(grid, centroids[name].sort().values)
        assert grid.numel() <= 8 and torch.all(grid[1:] > grid[:-1])
        nearest = (latent[name].unsqueeze(-1) - grid).abs().argmin(-1)  # brute force
        assert torch.equal(model.get_parameter(name), grid[nearest])


def test_a_deep_copy_finalizes_without_touching_the_original():
    model, method, _ = prepared(bits=2)
    snapped = copy.deepcopy(model)
    copy.deepcopy(method).finalize(snapped, 2)
    assert not parametrize.is_parametrized(snapped[0])
    model(torch.randn(2, 1, 8, 8)).sum().backward()  # the original still trains
    assert model[0].parametrizations.weight[0].codebook.normalized.grad is not None


def test_config_is_validated():
    for field, value in (("tau", 0.0), ("init", "median"), ("lr_scale", -1.0),
                         ("include", "features.*")):
        with pytest.raises(ConfigError, match=field):
            DKMConfig(**{field: value})
    with pytest.raises(ConfigError, match="bits"):
        DKMMethod().prepare(small_net(), 0, seed=0)


@pytest.mark.parametrize("bits", [2, 4])
def test_one_epoch_on_lenet5_then_snap(tiny_splits, bits):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    method = DKMMethod()
    method.prepare(model, bits, seed=0)
    config = TrainConfig(model="lenet5", epochs=1, optimizer="adam", lr=1e-3, batch_size=64)
    engine.train(model, tiny_splits, config, method=method, progress=False, augment=False)
    report = method.convert(model, bits, engine.bn_loader(tiny_splits, config))
    assert len(report.tensors) == 5
    for t in report.tensors:
        assert model.get_parameter(t.name).unique().numel() <= 2 ** bits
    assert engine.evaluate(model, tiny_splits.test, tiny_splits) > 30.0  # chance: 10%


def test_state_dict_restores_centroids_and_temperature_into_a_model_prepared_alike():
    trained, _, _ = prepared(bits=2, seed=0)
    fresh, _, found = prepared(bits=2, seed=1)
    before = found["3.weight"][1].temperature.clone()
    fresh.load_state_dict(trained.state_dict())
    assert not torch.equal(found["3.weight"][1].temperature, before)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(fresh(x), trained(x))
