"""Snapped forward passes with straight-through gradients, alone and in the engine."""

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import qareg
from qareg.config import TrainConfig, from_dict
from qareg.engine import train
from qareg.errors import ConfigError
from qareg.methods.qareg import QaregConfig, QaregMethod
from qareg.straight_through import straight_through


def prepared_lenet(k=4):
    torch.manual_seed(0)
    return qareg.prepare(qareg.create_model("lenet5", 10, 1, 28), k=k)


def test_forward_inside_equals_the_converted_network():
    model = prepared_lenet().eval()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    snapped = copy.deepcopy(model)
    qareg.convert(snapped)
    with straight_through(model):
        inside = model(x)
    assert torch.equal(inside, snapped(x))
    assert not torch.equal(model(x), inside)  # outside, the latent weights again


def test_the_model_is_left_exactly_as_it_was():
    model = prepared_lenet()
    params = list(model.named_parameters())
    keys = list(model.state_dict())
    classes = [type(m) for m in model.modules()]
    with straight_through(model):
        model(torch.randn(2, 1, 28, 28))
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in params]
    assert list(model.state_dict()) == keys
    assert [type(m) for m in model.modules()] == classes


def test_gradients_are_straight_through_to_weights_and_summed_to_representatives():
    model = prepared_lenet().eval()
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.arange(16) % 10
    with straight_through(model):
        F.cross_entropy(model(x), y).backward()
    # the reference: the snapped network's own gradient with respect to its weights
    snapped = copy.deepcopy(model)
    snapped.zero_grad()
    qareg.convert(snapped)
    F.cross_entropy(snapped(x), y).backward()
    for t, s in zip(qareg.quantized_tensors(model), qareg.quantized_tensors(snapped),
                    strict=True):
        assert torch.allclose(t.weight.grad, s.weight.grad, rtol=1e-5, atol=1e-7)
        indices = t.codebook.assign(t.weight).flatten()
        per_representative = torch.zeros(t.codebook.k).index_add_(0, indices,
                                                                  s.weight.grad.flatten())
        expected = per_representative * t.codebook.scale  # through normalized * scale
        assert torch.allclose(t.codebook.normalized.grad, expected, rtol=1e-4, atol=1e-7)


def test_the_model_is_restored_when_the_forward_pass_fails():
    model = prepared_lenet()
    keys = list(model.state_dict())
    with pytest.raises(RuntimeError), straight_through(model):
        model(torch.randn(2, 3, 28, 28))  # wrong channels
    assert list(model.state_dict()) == keys


def test_engine_snaps_the_forward_pass_in_the_last_fraction_only(tiny_splits):
    model = prepared_lenet()
    config = TrainConfig(epochs=2, batch_size=64, optimizer="adam", lr=1e-3)
    steps = 2 * (len(tiny_splits.train) // 64)
    entered = []
    original = straight_through

    def spy(model, *args):
        entered.append(len(seen))
        return original(model, *args)

    seen = []
    with mock.patch("qareg.methods.qareg.straight_through", spy):
        method = QaregMethod(QaregConfig(k=4, lam=10.0, snapped_fraction=0.25))
        train(model, tiny_splits, config, method, progress=False, on_step=seen.append)
    assert entered == list(range(steps - steps // 4, steps))


def test_training_with_the_snapped_forward_moves_weights_across_midpoints(tiny_splits):
    model = prepared_lenet()
    before = [t.codebook.assign(t.weight) for t in qareg.quantized_tensors(model)]
    config = TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=3e-3)
    method = QaregMethod(QaregConfig(k=4, lam=0.0, snapped_fraction=1.0))
    history = train(model, tiny_splits, config, method, progress=False)
    changed = sum(int((t.codebook.assign(t.weight) != b).sum())
                  for t, b in zip(qareg.quantized_tensors(model), before, strict=True))
    assert changed > 0
    assert history[-1].val_accuracy_quantized > 50  # it learned through the snapped network


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "half", True])
def test_snapped_fraction_is_validated(value):
    with pytest.raises(ConfigError, match="snapped_fraction"):
        QaregConfig(snapped_fraction=value)


def test_lambda_switches_to_its_own_value_in_the_snapped_phase():
    config = QaregConfig(lam=1000.0, snapped_fraction=0.4, snapped_lam=5.0)
    assert config.lambda_at(0.3) == pytest.approx(300.0)  # the linear ramp before
    assert config.lambda_at(0.6) == 5.0 and config.lambda_at(0.99) == 5.0
    assert QaregConfig(lam=1000.0, snapped_fraction=0.4).lambda_at(0.8) == 800.0


@pytest.mark.parametrize("value", [-1.0, float("inf"), "0"])
def test_snapped_lambda_is_validated(value):
    with pytest.raises(ConfigError, match="snapped_lam"):
        QaregConfig(snapped_fraction=0.5, snapped_lam=value)


def test_the_names_of_the_last_release_still_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match="'straight_through' .* now called "
                      "'snapped_fraction'"):
        config = from_dict(QaregConfig, {"straight_through": 0.4, "straight_through_lam": 5.0})
    assert (config.snapped_fraction, config.snapped_lam) == (0.4, 5.0)
    with pytest.raises(ConfigError, match="one setting"):
        from_dict(QaregConfig, {"straight_through": 0.4, "snapped_fraction": 0.5})


def test_the_snapped_forward_saves_one_byte_per_weight_for_backward():
    from qareg.straight_through import SnappedStraightThrough

    latent = torch.randn(10_000, requires_grad=True)
    representatives = torch.linspace(-2, 2, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = SnappedStraightThrough.apply(latent, representatives)
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, 10_000)]
    weights = torch.rand(10_000)
    (out * weights).sum().backward()
    assert torch.equal(latent.grad, weights)
    index = qareg.assign(latent.detach(), representatives.detach())
    assert torch.allclose(representatives.grad,
                          torch.zeros(16).index_add_(0, index, weights), rtol=1e-5)


@pytest.mark.parametrize("variant", ["hard", "abs"])
def test_the_penalty_found_while_snapping_equals_the_penalty_after(variant):
    torch.manual_seed(0)  # a 1.2M-entry layer: the sums run over several slices and threads
    model = torch.nn.Sequential(torch.nn.Linear(1200, 1000), torch.nn.ReLU(),
                                torch.nn.Linear(1000, 10))
    qareg.prepare(model, k=4)
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 1200), torch.randint(0, 10, (16,))
    terms = {}
    with straight_through(model, terms, variant):
        task = F.cross_entropy(model(x), y)
    assert set(terms) == {"0.weight", "2.weight"}
    (task + 0.7 * qareg.quantize.weighted_sum(terms)).backward()
    with straight_through(twin):
        twin_task = F.cross_entropy(twin(x), y)
    twin_penalty = qareg.penalty(twin, variant)
    (twin_task + 0.7 * twin_penalty).backward()
    assert torch.equal(qareg.quantize.weighted_sum(terms), twin_penalty)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name  # bit for bit: the same sums, same order


def test_soft_penalties_and_grouped_codebooks_are_computed_after_the_pass():
    model = prepared_lenet()
    terms = {}
    with straight_through(model, terms, "soft"):
        model(torch.randn(2, 1, 28, 28))
    assert terms == {}  # the caller then computes the penalty itself
