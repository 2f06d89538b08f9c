"""Size budgets: entropy-constrained assignment meets a budget in stored bits per weight."""

import copy
import warnings

import numpy as np
import pytest
import torch

import qareg
from qareg.budget import meet_budget, training_cuts
from qareg.compress import save_compressed
from qareg.config import TrainConfig
from qareg.engine import convert_with_data, train
from qareg.errors import ConfigError
from qareg.methods import create_method
from qareg.quantize import quantized_tensors


def stored_bits(model, path) -> tuple[float, list[int]]:
    """The file's index and codebook bits per quantized weight, and each tensor's k."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lenet5 has no batch norm to re-estimate
        qareg.convert(model)
    info = save_compressed(model, path)
    return 8 * (info.index_bytes + info.codebook_bytes) / info.quantized_weights, [
        t.k for t in info.tensors]


def prepared(k: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    return qareg.prepare(model, k, seed=0)


@pytest.mark.parametrize("budget", [0.5, 0.75, 1.0, 1.5, 2.5])
def test_the_file_meets_the_budget_within_two_percent(budget, tmp_path):
    model = prepared(2 ** max(1, -int(-budget // 1)))
    before = {t.name: set(t.codebook.representatives().tolist()) for t in
              quantized_tensors(model)}
    meet_budget(model, budget)
    bits, ks = stored_bits(model, tmp_path / "m.qz")
    assert 0.95 * budget <= bits <= 1.02 * budget, (budget, bits)
    assert all(k >= 2 for k in ks)
    for t in quantized_tensors(model):  # learned values kept, unused ones dropped
        assert set(t.codebook.representatives().tolist()) <= before[t.name]


def test_k_follows_from_the_budget_and_need_not_be_a_power_of_two(tmp_path):
    model = prepared(8)
    meet_budget(model, 2.5)
    ks = [t.codebook.k for t in quantized_tensors(model)]
    assert any(k & (k - 1) for k in ks), ks  # some k is not a power of two


def test_a_model_under_its_budget_is_left_as_it_is():
    model = prepared(4)
    weights = {t.name: t.weight.detach().clone() for t in quantized_tensors(model)}
    meet_budget(model, 8.0)
    for t in quantized_tensors(model):  # snapped to the nearest, nothing reassigned
        assert torch.equal(t.weight, t.codebook.quantize(weights[t.name]))
        assert t.codebook.k == 4


def test_an_impossible_budget_is_refused():
    with pytest.raises(ConfigError, match="cannot be stored that small"):
        meet_budget(prepared(2), 0.001)
    with pytest.raises(ConfigError, match="bits_per_weight"):
        meet_budget(prepared(2), -1.0)


def test_qareg_trained_with_a_budget_stores_to_it(tiny_splits, tmp_path):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    method = create_method("qareg", {"budget": 0.75})
    method.prepare(model, None, seed=0)
    assert {t.codebook.k for t in quantized_tensors(model)} == {2}
    config = TrainConfig(model="lenet5", epochs=1, optimizer="adam", lr=1e-3, batch_size=64)
    train(model, tiny_splits, config, method, augment=False, progress=False)
    convert_with_data(copy.deepcopy(model), tiny_splits, config, method)  # leaves model as is
    convert_with_data(model, tiny_splits, config, method)
    bits, _ = stored_bits(model, tmp_path / "m.qz")
    assert 0.95 * 0.75 <= bits <= 1.02 * 0.75


def test_fractional_bits_are_budgets_for_qareg_and_refused_by_the_others():
    method = create_method("qareg")
    model = qareg.create_model("lenet5", 10, 1, 28)
    method.prepare(model, 1.5, seed=0)
    assert {t.codebook.k for t in quantized_tensors(model)} == {4}  # 2**ceil(1.5)
    assert method.resolve_bits(2.0) == 2 and method.budget_for(1.5) == 1.5
    with pytest.raises(ConfigError, match=r"'lsq' takes whole bit-widths .* not a budget of "
                                          r"0.75 .* fractional budgets: qareg"):
        create_method("lsq").resolve_bits(0.75)


def test_the_cli_takes_a_budget_for_qareg_only(fashion_dir, monkeypatch, tmp_path, capsys):
    from qareg.cli import main

    monkeypatch.setenv("QAREG_DATA", str(fashion_dir))
    out = tmp_path / "lsq.pt"
    assert main(["train", "--method", "lsq", "--bits", "0.75", "--out", str(out),
                 "--epochs", "1", "--val-size", "200"]) == 2
    assert "not a budget of 0.75" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["train", "--method", "qareg", "--bits", "three", "--out", str(out)])
    assert "fractional budget such as 0.75, got 'three'" in capsys.readouterr().err


def test_the_bench_runs_budgets_with_the_methods_that_take_them(fashion_dir, tmp_path):
    from qareg.bench import Bench, BenchConfig

    config = BenchConfig(model="lenet5", methods=("ptq-kmeans", "qareg"), bits=(0.75, 1),
                         seeds=(0,), pretrain_epochs=1, epochs=1, batch_size=64, val_size=200,
                         data_dir=str(fashion_dir), augment=False)
    assert config.skipped() == [("ptq-kmeans", 0.75)]
    rows = Bench(config, tmp_path / "r.jsonl", progress=False).run()
    runs = {(r["method"], r["bits"]) for r in rows}
    assert runs == {("fp", 32), ("ptq-kmeans", 1), ("qareg", 0.75), ("qareg", 1)}
    budget = next(r for r in rows if r["bits"] == 0.75)
    stored = 8 * (budget["index_bytes"] + budget["codebook_bytes"]) / 61470
    assert 0.95 * 0.75 <= stored <= 1.02 * 0.75
    assert Bench(config, tmp_path / "r.jsonl", progress=False).run() == []  # resumes


def test_sensitive_tensors_keep_more_bits(tmp_path):
    """Weighting one tensor's distortion far above the others moves bits to it."""
    from qareg.compress.entropy import empirical_entropy_bytes

    def bits_of(model, name):
        t = next(t for t in quantized_tensors(model) if t.name == name)
        index = t.codebook.assign(t.weight).numpy()
        return 8 * empirical_entropy_bytes(index, t.codebook.k) / t.weight.numel()

    plain, weighted = prepared(4), prepared(4)
    meet_budget(plain, 1.0)
    meet_budget(weighted, 1.0, {"classifier.2.weight": 1e4})
    assert bits_of(weighted, "classifier.2.weight") > bits_of(plain, "classifier.2.weight")
    assert bits_of(weighted, "classifier.0.weight") < bits_of(plain, "classifier.0.weight")
    bits, _ = stored_bits(weighted, tmp_path / "w.qz")
    assert 0.95 <= bits <= 1.02


def test_fisher_sensitivity_is_positive_and_leaves_the_model_alone(tiny_splits):
    from qareg.evaluation import bn_loader
    from qareg.sensitivity import fisher_sensitivity

    model = prepared(4).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = bn_loader(tiny_splits, TrainConfig(model="lenet5", batch_size=64))
    sensitivity = fisher_sensitivity(model, batches, max_batches=2)
    assert set(sensitivity) == {t.name for t in quantized_tensors(model)}
    assert all(value > 0 and np.isfinite(value) for value in sensitivity.values())
    assert model.training and all(torch.equal(p, before[n])
                                   for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_training_cuts_give_the_assignment_meet_budget_makes(tmp_path):
    model = prepared(4)
    twin = copy.deepcopy(model)
    mu = training_cuts(model, 0.8, sample=1 << 20)  # every weight: the shares exactly
    assert mu > 0
    under_cuts = {t.name: t.codebook.assign(t.weight) for t in quantized_tensors(model)}
    meet_budget(twin, 0.8)  # snaps to the same assignment, dropping unused representatives
    for t in quantized_tensors(twin):
        values = {t.name: t for t in quantized_tensors(model)}[t.name].codebook
        expected = values.representatives()[under_cuts[t.name]].to(t.weight.dtype)
        # the same but for weights within float rounding of a boundary (computed in float64
        # on weights / scale, applied in float32 to the weights)
        assert (t.weight != expected).float().mean() <= 1e-3, t.name
    meet_budget(model, 0.8)  # the cuts are cleared: conversion is the nearest rule again
    assert all(t.codebook.cuts is None for t in quantized_tensors(model))


def test_qareg_trained_under_its_budget_s_assignment_loses_less_when_it_is_met(tiny_splits):
    results = {}
    for steps in (0, 10):
        torch.manual_seed(0)
        model = qareg.create_model("lenet5", 10, 1, 28)
        config = TrainConfig(epochs=2, batch_size=64, optimizer="adam", lr=1e-3)
        train(model, tiny_splits, config, progress=False)
        method = create_method("qareg", {"budget_steps": steps})
        method.prepare(model, 0.6, seed=0)
        train(model, tiny_splits, config, method, progress=False)
        before = qareg.engine.evaluate(model, tiny_splits.val, tiny_splits)
        method.convert(model, 0.6)
        results[steps] = before - qareg.engine.evaluate(model, tiny_splits.val, tiny_splits)
    assert results[10] < results[0]  # the budget's assignment was learned, not imposed


def test_a_budget_keeps_the_pinned_zero_and_what_was_assigned(tmp_path):
    model = prepared(4)
    for t in quantized_tensors(model):
        t.codebook.zero = True
        t.codebook.project_()
    meet_budget(model, 0.6)
    snapped = {t.name: t.weight.detach().clone() for t in quantized_tensors(model)}
    qareg.convert(model)  # the projection must not move another value to zero
    for t in quantized_tensors(model):
        assert torch.equal(t.weight, snapped[t.name]), t.name
        assert int((t.codebook.representatives() == 0).sum()) == 1


def test_a_budget_under_one_bit_with_a_zero_starts_ternary():
    method = create_method("qareg", {"zero": True})
    method.prepare(qareg.create_model("lenet5", 10, 1, 28), 0.75, seed=0)
    assert method.codebook_size(0.75) == 3 and create_method("qareg").codebook_size(0.75) == 2


def test_budget_k_sets_the_codebooks_a_budget_starts_from_and_is_checked():
    method = create_method("qareg", {"budget_k": 12})
    model = qareg.create_model("lenet5", 10, 1, 28)
    method.prepare(model, 1.25, seed=0)
    assert {t.codebook.k for t in quantized_tensors(model)} == {12}
    assert method.codebook_size(3) == 8  # whole bits still set k = 2**bits
    with pytest.raises(ConfigError, match="budget_k"):
        create_method("qareg", {"budget_k": 2, "zero": True})
    with pytest.raises(ConfigError, match="budget_k=12 .* bits=3 is whole"):
        create_method("qareg", {"budget_k": 12}).prepare(
            qareg.create_model("lenet5", 10, 1, 28), 3, seed=0)


def test_convert_snaps_by_the_trained_assignment_and_the_file_stores_it(tmp_path):
    model = prepared(4)
    training_cuts(model, 0.8)
    expected = {t.name: t.codebook.quantize(t.weight) for t in quantized_tensors(model)}
    qareg.convert(model)
    for t in quantized_tensors(model):
        assert t.codebook.cuts is None and torch.equal(t.weight, expected[t.name])
    save_compressed(model, tmp_path / "m.qz")  # every weight maps back to its own value


def index_entropy(t) -> float:
    """Bits per weight of the empirical entropy of `t`'s assignment to its codebook."""
    counts = torch.bincount(t.codebook.assign(t.weight).reshape(-1)).double()
    shares = counts[counts > 0] / counts.sum()
    return float(-(shares * shares.log2()).sum())


def test_training_cuts_weighted_by_sensitivity_keep_more_bits_where_it_is_high():
    alike, weighted = prepared(4), prepared(4)
    first = quantized_tensors(weighted)[0].name
    training_cuts(alike, 0.8, sample=1 << 20)
    training_cuts(weighted, 0.8, sample=1 << 20, sensitivity={first: 1e3})
    entropy = {id(m): {t.name: index_entropy(t) for t in quantized_tensors(m)}
               for m in (alike, weighted)}
    assert entropy[id(weighted)][first] > entropy[id(alike)][first] + 0.2
    assert entropy[id(weighted)][first] > 1.5  # nearly all four levels, where alike prunes


def test_budget_fisher_needs_budget_steps():
    create_method("qareg", {"budget_fisher": True, "budget_steps": 5})
    with pytest.raises(ConfigError, match="budget_fisher .* budget_steps is 0"):
        create_method("qareg", {"budget_fisher": True})


def test_budget_fisher_measures_sensitivities_and_the_file_keeps_the_learned_assignment(
        tiny_splits, tmp_path):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    config = TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=1e-3)
    method = create_method("qareg", {"budget_steps": 4, "budget_fisher": True, "zero": True})
    method.prepare(model, 0.6, seed=0)
    train(model, tiny_splits, config, method, progress=False)
    names = [t.name for t in quantized_tensors(model)]
    sensitivity = method._sensitivity
    assert set(sensitivity) == set(names) and all(v > 0 for v in sensitivity.values())
    twin = copy.deepcopy(model)
    training_cuts(twin, 0.6, sensitivity=sensitivity)  # the rule training last used
    learned = {t.name: t.codebook.quantize(t.weight) for t in quantized_tensors(twin)}
    method.convert(model, 0.6)
    for t in quantized_tensors(model):  # the same but for float rounding at boundaries
        assert (t.weight != learned[t.name]).float().mean() <= 1e-3, t.name
    bits, _ = stored_bits(model, tmp_path / "m.qz")
    assert bits <= 0.6 * 1.02


def test_a_resumed_run_keeps_budget_fisher_s_sensitivities(tiny_splits):
    """The moving average lives in the method: the checkpoint carries it, so a run resumed
    with no step left meets its budget with it, not with every tensor alike."""
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    config = TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=1e-3)
    options = {"budget_steps": 4, "budget_fisher": True, "zero": True}
    method = create_method("qareg", options)
    method.prepare(model, 0.6, seed=0)
    saved = []
    train(model, tiny_splits, config, method, progress=False, save_state=saved.append)
    assert saved[-1]["method"]["sensitivity"] == method._sensitivity
    resumed = create_method("qareg", options)
    twin = copy.deepcopy(model)
    resumed.prepare(twin, 0.6, seed=0)
    train(twin, tiny_splits, config, resumed, progress=False, resume=saved[-1])
    assert resumed._sensitivity == method._sensitivity
    method.convert(model, 0.6)
    resumed.convert(twin, 0.6)
    for a, b in zip(quantized_tensors(model), quantized_tensors(twin), strict=True):
        assert torch.equal(a.weight, b.weight), a.name


def ternary_mixture(shares=(4500, 3000, 2500)) -> torch.nn.Module:
    """A layer whose weights cluster at -1, 0 and 1, with a ternary codebook there."""
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(c, 0.1, n)
                             for c, n in zip((-1, 0, 1), shares, strict=True)])
    layer = torch.nn.Linear(100, values.size // 100, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(rng.permutation(values).reshape(-1, 100)))
    return qareg.prepare(torch.nn.Sequential(layer), 3, seed=0, zero=True)


def test_a_zero_with_a_smaller_share_than_its_neighbour_keeps_the_weights_under_a_budget(
        tmp_path):
    """cnn4's last convolution under one bit: the neighbour held more weights by the nearest
    rule and took the zero's as the multiplier grew, leaving two values at a bit per weight;
    the dead zone keeps the zero, the cheapest value to store."""
    model = ternary_mixture()
    meet_budget(model, 0.6, dead_zones=True)
    bits, _ = stored_bits(model, tmp_path / "m.qz")
    assert bits <= 0.6 * 1.02
    values, counts = torch.unique(model[0].weight, return_counts=True)
    assert values.numel() == 3 and values[counts.argmax()].item() == 0


def test_no_tensor_ends_on_one_value_however_cheap_its_sensitivity_prices_it(tmp_path):
    """A tensor weighted a million times below the rest gives up nearly all its bits, but
    keeps two values in use and at most 98% of its weights on the zero."""
    model = prepared(3)
    for t in quantized_tensors(model):
        t.codebook.zero = True
        t.codebook.project_()
    names = [t.name for t in quantized_tensors(model)]
    meet_budget(model, 0.5, {n: 1e-6 if n == names[-2] else 1.0 for n in names},
                dead_zones=True)
    bits, _ = stored_bits(model, tmp_path / "m.qz")
    assert bits <= 0.5 * 1.02
    for t in quantized_tensors(model):
        values, counts = torch.unique(t.weight, return_counts=True)
        assert values.numel() >= 2, t.name
        assert counts[values == 0].sum() <= 0.98 * t.weight.numel() + 1, t.name


@pytest.mark.parametrize("budget", [0.5, 0.75, 1.0])
def test_with_dead_zones_the_file_meets_the_budget_closely(budget, tmp_path):
    """Dead zones on a fine grid of shares: the bits move in small steps with the
    multiplier, so the file is at most 2% over the budget and not far under it."""
    model = prepared(3)
    for t in quantized_tensors(model):
        t.codebook.zero = True
        t.codebook.project_()
    meet_budget(model, budget, dead_zones=True)
    bits, _ = stored_bits(model, tmp_path / "m.qz")
    assert 0.93 * budget <= bits <= 1.02 * budget, (budget, bits)


def test_budget_fisher_power_shrinks_the_spread_of_the_sensitivities():
    method = create_method("qareg", {"budget_steps": 4, "budget_fisher": True,
                                     "budget_fisher_power": 0.5})
    assert method._weights({"a": 4.0, "b": 1e-4}) == pytest.approx({"a": 2.0, "b": 1e-2})
    assert create_method("qareg")._weights({"a": 4.0}) == {"a": 4.0}  # power 1: as measured
    with pytest.raises(ConfigError, match="budget_fisher_power must be a number >= 0 and <= 1"):
        create_method("qareg", {"budget_fisher_power": 1.5})
