"""qareg.uniform (the grid and its scale search), qareg.activations, and ptq-uniform."""

import copy

import pytest
import torch
from torch import nn

import qareg
from qareg import engine
from qareg.activations import quantize_activations
from qareg.config import TrainConfig
from qareg.errors import ConfigError
from qareg.methods.ptq_uniform import PtqUniformMethod, UniformConfig
from qareg.uniform import (
    integer_range,
    quantize_weights_,
    uniform_grid,
    uniform_quantize,
    uniform_scale,
)


def gaussian(seed=0, shape=(16, 64)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("bits", range(1, 9))
def test_quantized_values_lie_on_a_grid_of_at_most_2_to_the_bits(bits):
    w = gaussian(bits)
    scale = uniform_scale(w, bits)
    grid = uniform_grid(scale, bits)
    q = uniform_quantize(w, scale, bits)
    assert scale.shape == () and grid.shape == (2 ** bits,)
    assert (grid[1:] > grid[:-1]).all()  # sorted and distinct
    assert q.shape == w.shape
    assert torch.isin(q, grid).all()  # exactly on the grid, not merely near it
    assert q.unique().numel() <= 2 ** bits
    # nearest level inside the clipping range: the error is at most half a step
    step = grid[1] - grid[0]
    inside = (w >= grid[0]) & (w <= grid[-1])
    if bits > 1:
        assert ((q - w).abs()[inside] <= step / 2 + 1e-6).all()


def test_full_signed_integer_range():
    assert integer_range(2) == (-2, 1) and integer_range(4) == (-8, 7)
    assert integer_range(4, signed=False) == (0, 15)
    grid = uniform_grid(torch.tensor(0.5), 2)
    assert grid.tolist() == [-1.0, -0.5, 0.0, 0.5]  # 4 levels at 2 bits, not 3


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_mse_search_is_the_best_ratio_and_no_worse_than_max_abs(bits):
    w = gaussian(10 + bits, (4000,))
    n = 50
    scale = uniform_scale(w, bits, clip_ratios=n)
    _, qmax = integer_range(bits)

    def mse(s):
        return (uniform_quantize(w, s, bits) - w).square().mean().item()

    brute = [mse(torch.tensor(i / n * w.abs().max().item() / qmax)) for i in range(1, n + 1)]
    assert mse(scale) == pytest.approx(min(brute), rel=1e-5)
    max_abs = uniform_scale(w, bits, clip_ratios=1)
    assert max_abs.item() == pytest.approx(w.abs().max().item() / qmax)
    assert mse(scale) <= mse(max_abs)
    if bits <= 4:  # a Gaussian's tails are worth clipping at low bit-widths
        assert mse(scale) < 0.9 * mse(max_abs)


def test_one_bit_is_plus_minus_mean_abs():
    w = gaussian(3)
    scale = uniform_scale(w, 1)
    assert scale.item() == pytest.approx(w.abs().mean().item())
    q = uniform_quantize(w, scale, 1)
    assert set(q.unique().tolist()) == {-scale.item(), scale.item()}
    assert torch.equal(q > 0, w >= 0)
    assert uniform_grid(scale, 1).tolist() == [-scale.item(), scale.item()]
    # mean|w| is the least-squares level of s * sign(w)
    errors = [(uniform_quantize(w, scale * f, 1) - w).square().sum().item()
              for f in (0.9, 1.0, 1.1)]
    assert errors[1] < errors[0] and errors[1] < errors[2]


@pytest.mark.parametrize("bits", [1, 4])
def test_per_channel_has_one_scale_per_output_channel(bits):
    # channels of very different magnitudes: one shared scale would waste most levels
    w = gaussian(4, (6, 3, 3, 3)) * torch.logspace(-2, 0, 6).view(-1, 1, 1, 1)
    scale = uniform_scale(w, bits, per_channel=True)
    assert scale.shape == (6,)
    for c in range(6):
        assert scale[c] == uniform_scale(w[c], bits)  # the same search on the channel alone
    grid = uniform_grid(scale, bits)
    q = uniform_quantize(w, scale, bits)
    assert grid.shape == (6, 2 ** bits)
    for c in range(6):
        assert torch.isin(q[c], grid[c]).all()
    per_tensor = uniform_quantize(w, uniform_scale(w, bits), bits)
    assert (q - w).square().sum() < (per_tensor - w).square().sum()


def test_zero_tensor_stays_zero():
    w = torch.zeros(5, 4)
    for bits in (1, 2, 4):
        assert torch.equal(uniform_quantize(w, uniform_scale(w, bits), bits).abs(), w)


def test_activation_hooks_quantize_layer_inputs_and_are_removed():
    model = small_net().eval()
    calibration = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(i))
                   for i in range(3)]
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    reference = model(x)
    handle = quantize_activations(model, 3, calibration, percentile=100.0)
    seen = {}

    def spy(name):
        def hook(module, args):
            seen[name] = args[0].detach().clone()
        return hook

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    spies = [m.register_forward_pre_hook(spy(n)) for n, m in layers.items()]  # after: sees q
    quantized_out = model(x)
    for handle_ in spies:
        handle_.remove()
    assert set(seen) == set(handle.grids) == set(layers)
    for name, inputs in seen.items():
        scale, qmin, qmax = handle.grids[name]
        assert inputs.unique().numel() <= 8
        codes = inputs / scale
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.min() >= qmin - 1e-4 and codes.max() <= qmax + 1e-4
    assert handle.grids["0"][1] < 0  # the network input is signed
    assert handle.grids["3"][1:] == (0, 7)  # after the ReLU: unsigned, all 8 levels
    assert handle.grids["5"][1] < 0  # after tanh: signed
    assert not torch.allclose(quantized_out, reference)
    handle.remove()
    assert torch.equal(model(x), reference)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_activation_range_percentile_clips_outliers():
    model = nn.Sequential(nn.Linear(100, 2))
    batch = torch.rand(50, 100, generator=torch.Generator().manual_seed(0))
    batch[0, 0] = 1000.0  # one outlier among 5000 values
    full = quantize_activations(model, 4, [batch], percentile=100.0)
    assert full.grids["0"] == (pytest.approx(1000.0 / 15), 0, 15)
    with pytest.raises(ConfigError, match="already has activation quantizers"):
        quantize_activations(model, 4, [batch])
    full.remove()
    with quantize_activations(model, 4, [batch], percentile=99.9) as clipped:
        assert 0.9 / 15 < clipped.grids["0"][0] < 1.0 / 15
    assert not model[0]._forward_pre_hooks


def test_config_validation():
    with pytest.raises(ConfigError, match="clip_ratios"):
        UniformConfig(clip_ratios=0)
    with pytest.raises(ConfigError, match="per_channel"):
        UniformConfig(per_channel=1)
    with pytest.raises(ConfigError, match="bits"):
        quantize_activations(small_net(), 1, [torch.randn(2, 1, 8, 8)])


def test_ptq_uniform_refuses_per_channel_before_training():
    with pytest.raises(ConfigError, match="per_channel=True cannot be finalized.*one codebook"):
        PtqUniformMethod(UniformConfig(per_channel=True))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_ptq_uniform_finalize_and_snap(bits):
    model = small_net(1)
    method = PtqUniformMethod()
    method.prepare(model, None, 0)
    grids = method.finalize(copy.deepcopy(model), bits)
    assert set(grids) == {"0.weight", "3.weight", "5.weight"}
    report = method.convert(model, bits)
    for name, grid in grids.items():
        weight = model.get_parameter(name)
        assert grid.dim() == 1 and grid.numel() <= 2 ** bits and (grid[1:] > grid[:-1]).all()
        assert torch.allclose(weight, grid[(weight[..., None] - grid).abs().argmin(-1)])
        assert weight.unique().numel() <= 2 ** bits
    assert all(t.distinct <= 2 ** bits for t in report.tensors)


def test_quantize_weights_per_channel_grids():
    model = small_net(2)
    grids = quantize_weights_(model, 3, per_channel=True)
    assert grids["3.weight"].shape == (8, 8)
    weight = model.get_parameter("3.weight")
    for c in range(8):
        assert torch.isin(weight[c], grids["3.weight"][c]).all()


def test_ptq_uniform_end_to_end(tiny_splits):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    config = TrainConfig(model="lenet5", epochs=1, optimizer="adam", lr=1e-3, batch_size=64)
    method = PtqUniformMethod()
    method.prepare(model, None, 0)
    engine.train(model, tiny_splits, config, method=method, progress=False, augment=False)
    float_accuracy = engine.evaluate(model, tiny_splits.test, tiny_splits)
    method.convert(model, 8, engine.bn_loader(tiny_splits, config), 2)
    for name in ("features.0.weight", "classifier.0.weight"):
        assert model.get_parameter(name).unique().numel() <= 256
    accuracy = engine.evaluate(model, tiny_splits.test, tiny_splits)
    assert accuracy > 30.0 and abs(accuracy - float_accuracy) < 5.0
