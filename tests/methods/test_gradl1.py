import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qareg
from qareg import engine
from qareg.config import TrainConfig
from qareg.errors import ConfigError, QaregError
from qareg.evaluation import eval_loader
from qareg.methods.base import Progress
from qareg.methods.gradl1 import (
    GradL1Config,
    GradL1Method,
    bit_width_sweep,
    find_recorder,
    gradient_l1_norms,
)

PROGRESS = Progress(step=0, total_steps=1, epoch=1, epochs=1)


def tiny_net(seed=0):
    """Conv, Linear, Linear in float64, with tanh: second derivatives everywhere."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 6),
                         nn.Tanh(), nn.Linear(6, 4)).double()


def tiny_batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (n,), generator=g))


def prepared(seed=0, **config):
    model = tiny_net(seed)
    method = GradL1Method(GradL1Config(**config))
    method.prepare(model, None, 0)
    return model, method


def penalty_of(model, method, x, y):
    return method.regularizer(model, F.cross_entropy(model(x), y), PROGRESS)


def test_penalty_equals_l1_norms_of_separately_computed_gradients():
    model, method = prepared()
    x, y = tiny_batch()
    value = penalty_of(model, method, x, y)
    # the same network written out by hand, its activations explicit
    conv, linear1, linear2 = model[0], model[3], model[5]
    a1 = torch.tanh(conv(x)).flatten(1)  # input of linear1
    a2 = torch.tanh(linear1(a1))  # input of linear2
    loss = F.cross_entropy(linear2(a2), y)
    weights = [conv.weight, linear1.weight, linear2.weight]
    grads = torch.autograd.grad(loss, weights + [a1, a2])
    expected = sum(g.abs().sum() for g in grads)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    weights_only, method_w = prepared(activations=False)
    value_w = penalty_of(weights_only, method_w, x, y)
    assert value_w.item() == pytest.approx(sum(g.abs().sum() for g in grads[:3]).item(),
                                           rel=1e-12)


def test_penalty_gradient_matches_central_differences():
    model, method = prepared(seed=1)
    x, y = tiny_batch(1)
    params = [model[0].weight, model[3].weight, model[5].weight, model[3].bias]
    grads = torch.autograd.grad(penalty_of(model, method, x, y), params)  # double backprop
    g = torch.Generator().manual_seed(0)
    eps = 1e-6
    for param, grad in zip(params, grads, strict=True):
        for i in torch.randperm(param.numel(), generator=g)[:4].tolist():
            flat = param.data.view(-1)
            original = flat[i].item()
            values = []
            for delta in (eps, -eps):
                flat[i] = original + delta
                values.append(penalty_of(model, method, x, y).item())
            flat[i] = original
            numeric = (values[0] - values[1]) / (2 * eps)
            assert grad.view(-1)[i].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_penalty_does_not_depend_on_batch_size():
    """Duplicating a batch leaves both terms unchanged: no 1/B in the activation term."""
    model, method = prepared(seed=2)
    x, y = tiny_batch(2)
    single = penalty_of(model, method, x, y)
    double = penalty_of(model, method, torch.cat([x, x]), torch.cat([y, y]))
    assert double.item() == pytest.approx(single.item(), rel=1e-12)


def test_gradient_l1_norms_of_an_unused_tensor_is_zero():
    w = torch.randn(3, requires_grad=True, dtype=torch.float64)
    unused = torch.randn(2, requires_grad=True, dtype=torch.float64)
    norms = gradient_l1_norms((w ** 2).sum(), [w, unused])
    assert torch.allclose(norms, torch.stack([(2 * w).abs().sum(), torch.zeros(())]).double())


def test_lam_is_zero_before_start_epoch():
    method = GradL1Method(GradL1Config(lam=0.3, start_epoch=3))
    assert [method.lam(Progress(e * 10, 50, e + 1, 5)) for e in range(5)] == [0, 0, 0.3, 0.3, 0.3]
    with pytest.raises(ConfigError, match="start_epoch 3 is after the last epoch"):
        method.lam(Progress(0, 20, 1, 2))


def test_config_validation():
    for field, value in (("lam", -1.0), ("start_epoch", 0), ("activations", "yes"),
                         ("clip_ratios", 0)):
        with pytest.raises(ConfigError, match=field):
            GradL1Config(**{field: value})


def test_recorder_keeps_only_the_current_forward():
    model, method = prepared(start_epoch=2)
    recorder = find_recorder(model)
    x, y = tiny_batch()
    with torch.no_grad():
        model(x)
    assert recorder.inputs == [] and recorder.calls == 0
    with pytest.raises(QaregError, match="no layer ran with gradients"):
        method.regularizer(model, torch.zeros((), dtype=torch.float64), PROGRESS)
    model(x)
    model(x)  # a second forward drops the first one's tensors
    assert len(recorder.inputs) == 2 and recorder.calls == 3  # the data input needs no grad
    penalty_of(model, method, x, y)
    assert recorder.inputs == [] and recorder.calls == 0
    model(x)
    assert method.lam(Progress(0, 10, 1, 2)) == 0.0  # before start_epoch 2
    assert recorder.inputs == []  # no regularizer this step: nothing held until the next


def test_deepcopy_and_finalize_leave_no_hooks():
    model, method = prepared()
    x, y = tiny_batch()
    model(x)  # non-leaf tensors in the recorder: deepcopy must still work
    duplicate = copy.deepcopy(model)
    assert find_recorder(duplicate) is not find_recorder(model)
    assert find_recorder(duplicate).inputs == []
    copy.deepcopy(method).finalize(duplicate, 4)
    assert all(not m._forward_pre_hooks for m in duplicate.modules())
    assert penalty_of(model, method, x, y).item() > 0  # the original keeps its hooks
    grids = method.finalize(model, 3)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert set(grids) == {"0.weight", "3.weight", "5.weight"}
    for name, grid in grids.items():
        assert grid.numel() <= 8 and torch.isin(model.get_parameter(name), grid).all()


def test_training_holds_no_tensors_between_steps(tiny_splits):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    method = GradL1Method(GradL1Config(start_epoch=2))
    method.prepare(model, None, 0)
    recorder = find_recorder(model)
    held = []
    config = TrainConfig(model="lenet5", epochs=2, optimizer="adam", lr=1e-3, batch_size=128)
    history = engine.train(model, tiny_splits, config, method=method, progress=False,
                           augment=False, on_step=lambda step: held.append(len(recorder.inputs)))
    assert held == [0] * 16
    assert history[0].penalty == 0 and history[0].lam == 0
    assert history[1].penalty > 0 and history[1].lam == method.config.lam


def test_penalty_lowers_the_gradient_l1_norm(tiny_splits):
    """From the same trained network, the same SGD steps with the penalty end with a far
    smaller gradient L1 norm on held-out data than without it."""
    torch.manual_seed(0)
    base = qareg.create_model("lenet5", 10, 1, 28)
    config = TrainConfig(model="lenet5", epochs=3, optimizer="adam", lr=1e-3, batch_size=64)
    engine.train(base, tiny_splits, config, progress=False, augment=False)
    x_val, y_val = next(iter(eval_loader(tiny_splits.val, tiny_splits, "cpu")))

    def held_out_norm(model, method):
        return penalty_of(model, method, x_val, y_val).item()

    norms = {}
    for lam in (0.0, 1e-3):
        model = copy.deepcopy(base)
        method = GradL1Method(GradL1Config(lam=lam))
        method.prepare(model, None, 0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for x, y in engine.bn_loader(tiny_splits, config):  # 16 steps, the same batches
            task = F.cross_entropy(model(x), y)
            loss = task + lam * method.regularizer(model, task, PROGRESS)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        norms[lam] = held_out_norm(model, method)
        assert engine.evaluate(model, tiny_splits.test, tiny_splits) > 90.0
    assert norms[1e-3] < 0.25 * norms[0.0], norms


def test_end_to_end_lenet(tiny_splits):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    config = TrainConfig(model="lenet5", epochs=1, optimizer="adam", lr=1e-3, batch_size=64)
    method = GradL1Method(GradL1Config(start_epoch=1))
    method.prepare(model, None, 0)
    history = engine.train(model, tiny_splits, config, method=method, progress=False,
                           augment=False)
    assert history[0].penalty > 0
    calibration = engine.bn_loader(tiny_splits, config)
    sweep = bit_width_sweep(model, tiny_splits, (8, 6, 4), "same", calibration=calibration)
    assert [(r["weight_bits"], r["activation_bits"]) for r in sweep] == [(8, 8), (6, 6), (4, 4)]
    assert all(r["accuracy"] > 30.0 for r in sweep), sweep
    per_channel = bit_width_sweep(model, tiny_splits, (4,), per_channel=True)
    assert len(per_channel) == 1 and per_channel[0]["per_channel"]
    assert find_recorder(model) is not None  # the sweep quantized copies only
    snapped = copy.deepcopy(model)
    report = method.convert(snapped, 4, calibration, 2)
    assert len(report.tensors) == 5
    for t in report.tensors:
        assert snapped.get_parameter(t.name).unique().numel() <= 16
    assert all(not m._forward_pre_hooks for m in snapped.modules())
    assert engine.evaluate(snapped, tiny_splits.test, tiny_splits) > 30.0  # chance: 10


def test_sweep_rejects_bad_arguments(tiny_splits):
    model = tiny_net()
    with pytest.raises(ConfigError, match="activation_bits"):
        bit_width_sweep(model, tiny_splits, (8, 4), activation_bits=(8,))
    with pytest.raises(ConfigError, match="calibration"):
        bit_width_sweep(model, tiny_splits, (8,), activation_bits="same")
    with pytest.raises(ConfigError, match="bits"):
        bit_width_sweep(model, tiny_splits, (9,))
