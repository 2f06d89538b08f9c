import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import qareg
from qareg import engine
from qareg.config import TrainConfig
from qareg.errors import ConfigError
from qareg.methods.lsq import (
    LSQConfig,
    LSQMethod,
    LSQQuantizer,
    lsq_quantize,
    lsq_range,
)
from qareg.methods.parametrized import find_parametrizations


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def expected_gradients(w, s, bits, upstream):
    """The paper's gradients, written out: d w_q / d s and d w_q / d w, per element."""
    qn, qp = lsq_range(bits)
    x = w / s
    inside = (x >= -qn) & (x <= qp)
    levels = torch.where(x >= 0, 1.0, -1.0).double() if bits == 1 else x.round()
    d_step = torch.where(inside, levels - x, torch.where(x < 0, -float(qn), float(qp)))
    g = 1 / math.sqrt(w.numel() * qp)
    return (upstream * d_step).sum() * g, upstream * inside


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_step_and_weight_gradients_match_the_lsq_formula(bits):
    g = torch.Generator().manual_seed(bits)
    s0 = 0.3
    qn, qp = lsq_range(bits)
    ratios = torch.empty(40, dtype=torch.float64).uniform_(-qn - 2, qp + 2, generator=g)
    # keep away from rounding midpoints and range ends, where the derivative jumps
    ratios = ratios[((ratios - ratios.floor() - 0.5).abs() > 0.05)
                    & ((ratios + qn).abs() > 0.05) & ((ratios - qp).abs() > 0.05)]
    w = (ratios * s0).requires_grad_()
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(w.shape, generator=g, dtype=torch.float64)
    (lsq_quantize(w, s, bits) * upstream).sum().backward()
    step_grad, weight_grad = expected_gradients(w.detach(), s0, bits, upstream)
    assert torch.allclose(s.grad, step_grad, rtol=1e-12, atol=1e-12)
    assert torch.allclose(w.grad, weight_grad, rtol=1e-12, atol=0)
    assert (ratios.abs() > max(qn, qp)).any() and (w.grad == 0).any()  # both cases covered


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_forward_values_lie_on_the_grid_of_integer_steps(bits):
    w = torch.randn(500, generator=torch.Generator().manual_seed(0)) * 0.1
    quantizer = LSQQuantizer(w, bits)
    q = quantizer(w)
    step = quantizer.step.item()
    levels = q.double() / step
    qn, qp = lsq_range(bits)
    assert torch.allclose(levels, levels.round(), atol=1e-5)
    assert levels.min() >= -qn - 1e-6 and levels.max() <= qp + 1e-6
    if bits == 1:
        assert set(levels.round().tolist()) == {-1.0, 1.0}
        assert torch.equal(q > 0, w >= 0)
    grid = quantizer.grid()
    assert grid.numel() == 2 ** bits and torch.all(grid[1:] > grid[:-1])
    assert torch.isin(q, grid).all()  # bit-exact: finalize returns the values the net used
    # the paper's initialisation
    assert step == pytest.approx(2 * w.abs().mean().item() / math.sqrt(qp), rel=1e-6)


def test_step_is_used_by_magnitude_and_never_below_its_floor():
    w = torch.randn(100, generator=torch.Generator().manual_seed(1))
    quantizer = LSQQuantizer(w, 3)
    before = quantizer(w)
    with torch.no_grad():
        quantizer.step.neg_()
    assert torch.equal(quantizer(w), before)
    with torch.no_grad():
        quantizer.step.zero_()
    out = quantizer(w)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    out.sum().backward()
    assert quantizer.step.grad is not None  # the floor passes the gradient


def test_prepare_parametrizes_every_selected_weight_and_param_groups_hold_the_steps():
    model = small_net()
    method = LSQMethod()
    method.prepare(model, 2, seed=0)
    found = find_parametrizations(model, LSQQuantizer)
    assert list(found) == ["0.weight", "3.weight"]
    assert not parametrize.is_parametrized(model[3], "bias")
    groups = method.param_groups(model)
    assert [id(p) for p in groups[0]["params"]] == [id(q.step) for _, q in found.values()]
    assert groups[0]["lr_scale"] == method.config.lr_scale
    assert {"0.parametrizations.weight.0.step", "3.parametrizations.weight.0.step"} <= set(
        model.state_dict())
    optimizer = engine.make_optimizer(model, TrainConfig(weight_decay=5e-4), method)
    assert [len(g["params"]) for g in optimizer.param_groups] == [4, 2]
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    x = torch.randn(3, 1, 8, 8)
    model(x).square().sum().backward()
    assert all(q.step.grad.abs() > 0 for _, q in found.values())
    with pytest.raises(ConfigError, match="prepare called twice"):
        method.prepare(model, 2, seed=0)


def test_finalize_leaves_a_plain_network_computing_the_same_function():
    model = small_net()
    method = LSQMethod()
    method.prepare(model, 3, seed=0)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    grids = method.finalize(model, 3)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert isinstance(model[0].weight, nn.Parameter)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    for name, grid in grids.items():
        weight = model.get_parameter(name)
        assert grid.numel() == 8 and torch.all(grid[1:] > grid[:-1])
        assert torch.isin(weight, grid).all()


def test_a_deep_copy_finalizes_without_touching_the_original():
    model = small_net()
    method = LSQMethod()
    method.prepare(model, 2, seed=0)
    snapped = copy.deepcopy(model)
    copy.deepcopy(method).finalize(snapped, 2)
    assert not parametrize.is_parametrized(snapped[0])
    assert parametrize.is_parametrized(model[0], "weight")
    model(torch.randn(2, 1, 8, 8)).sum().backward()  # the original still trains
    assert model[0].parametrizations.weight[0].step.grad is not None


def test_config_is_validated():
    with pytest.raises(ConfigError, match="lr_scale"):
        LSQConfig(lr_scale=0.0)
    with pytest.raises(ConfigError, match="exclude"):
        LSQConfig(exclude=("",))
    with pytest.raises(ConfigError, match="bits"):
        LSQMethod().prepare(small_net(), None, seed=0)
    assert LSQConfig(include=["0.*"]).include == ("0.*",)


@pytest.mark.parametrize("bits", [1, 2])
def test_one_epoch_on_lenet5_then_snap(tiny_splits, bits):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    method = LSQMethod()
    method.prepare(model, bits, seed=0)
    config = TrainConfig(model="lenet5", epochs=1, optimizer="adam", lr=1e-3, batch_size=64)
    history = engine.train(model, tiny_splits, config, method=method, progress=False,
                           augment=False)
    # the engine snapped a deep copy each epoch: that one saw what the network computes
    assert history[-1].val_accuracy_quantized == history[-1].val_accuracy
    report = method.convert(model, bits, engine.bn_loader(tiny_splits, config))
    assert len(report.tensors) == 5
    for t in report.tensors:
        assert model.get_parameter(t.name).unique().numel() <= 2 ** bits
    assert engine.evaluate(model, tiny_splits.test, tiny_splits) > 30.0  # chance: 10%


def test_state_dict_restores_the_steps_into_a_model_prepared_alike():
    trained, method = small_net(0), LSQMethod()
    method.prepare(trained, 2, seed=0)
    with torch.no_grad():
        trained[3].parametrizations.weight[0].step.mul_(1.7)
    fresh = small_net(1)
    LSQMethod().prepare(fresh, 2, seed=0)
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(fresh(x), trained(x))
