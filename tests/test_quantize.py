import pytest
import torch
from torch import nn

import qareg
from qareg.errors import ConfigError, NotPreparedError
from qareg.quantize import prepare_like, quantized_tensors, select_tensors


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.ConvTranspose2d(8, 4, 2, stride=2),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 10),
    )


def test_default_selection_is_conv_and_linear_weights():
    net = small_net()
    assert select_tensors(net) == ["0.weight", "3.weight", "4.weight", "6.weight"]


def test_include_exclude_and_filter_choose_other_tensors():
    net = small_net()
    assert select_tensors(net, include=["*.bias"]) == ["1.bias", "3.bias", "4.bias", "6.bias"]
    assert select_tensors(net, exclude=["6.*"]) == ["0.weight", "3.weight", "4.weight"]
    chosen = select_tensors(net, filter_fn=lambda name, p, m: isinstance(m, nn.BatchNorm2d))
    assert chosen == ["1.weight", "1.bias"]


def test_prepare_attaches_codebooks_seen_by_parameters_and_state_dict():
    net = qareg.prepare(small_net(), k=4, k_per_tensor={"6.weight": 16})
    ks = {t.name: t.codebook.k for t in quantized_tensors(net)}
    assert ks == {"0.weight": 4, "3.weight": 4, "4.weight": 4, "6.weight": 16}
    params = {name for name, _ in net.named_parameters()}
    assert "0.weight_codebook.normalized" in params
    assert "6.weight_codebook.scale" in net.state_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 1}, "k must be an integer from 2"),
        ({"k": 2.5}, "k must be an integer from 2"),
        ({"k": 73}, "k=73 is larger than tensor '0.weight' with 72 entries"),
        ({"k": 4, "include": ["nope.*"]}, "include pattern 'nope.\\*' matches no parameter"),
        ({"k": 4, "exclude": ["x"]}, "exclude pattern 'x' matches no parameter"),
        ({"k": 4, "k_per_tensor": {"6.weight": 1}}, "k for '6.weight' must be"),
        ({"k": 4, "init": "magic"}, "init must be one of linear, quantile, kmeans++"),
        ({"k": 4, "exclude": ["*"]}, "no parameter selected"),
    ],
)
def test_prepare_rejects_bad_input_and_names_it(kwargs, message):
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        qareg.prepare(net, **kwargs)
    assert not quantized_tensors(net)  # nothing attached
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_prepare_twice_is_an_error():
    net = qareg.prepare(small_net(), k=4)
    with pytest.raises(ConfigError, match="prepare was called twice"):
        qareg.prepare(net, k=4)


def test_penalty_errors_name_the_bad_value():
    net = small_net()
    with pytest.raises(NotPreparedError, match="call qareg.prepare"):
        qareg.penalty(net)
    qareg.prepare(net, k=4)
    with pytest.raises(ConfigError, match="unknown penalty variant 'l3'"):
        qareg.penalty(net, "l3")
    with pytest.raises(ConfigError, match="temperature must be a positive number, got -1"):
        qareg.penalty(net, "soft", temperature=-1)
    with pytest.raises(ConfigError, match="layer weight for '0.weight' must be >= 0"):
        qareg.penalty(net, layer_weights={"0.weight": -2.0})
    with pytest.raises(ConfigError, match="layer_weights pattern 'zz' matches no parameter"):
        qareg.penalty(net, layer_weights={"zz": 2.0})


def test_layer_weights_scale_each_term():
    net = qareg.prepare(small_net(), k=4)
    base = qareg.penalty(net).item()
    terms = qareg.quantize.penalty_terms(net)
    doubled = qareg.penalty(net, layer_weights={"6.weight": 3.0}).item()
    assert doubled == pytest.approx(base + 2 * terms["6.weight"].item(), rel=1e-5)
    zeroed = qareg.penalty(net, layer_weights={"*": 0.0}).item()
    assert zeroed == 0.0


@pytest.mark.parametrize("k", [2, 3, 5, 16])
def test_convert_leaves_at_most_k_distinct_values(k):
    net = qareg.prepare(small_net(), k=k)
    batches = [torch.randn(4, 1, 4, 4) for _ in range(3)]
    report = qareg.convert(net, bn_batches=batches)
    for t in quantized_tensors(net):
        values = torch.unique(t.weight.detach())
        assert values.numel() <= k
        reps = t.codebook.representatives().detach()
        assert torch.isin(values, reps).all()
    assert [r.k for r in report.tensors] == [k] * 4
    assert all(r.distinct <= k for r in report.tensors)
    assert report.batchnorm_batches == 3
    assert "bits/weight" in report.format_table()


def test_convert_report_measures_the_quantization_error():
    net = nn.Sequential(nn.Linear(1, 4, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.0], [0.1], [1.0], [1.2]]))
    qareg.prepare(net, k=2, init="linear")  # representatives 0 and 1.2
    report = qareg.convert(net)
    (t,) = report.tensors
    assert (t.k, t.bits, t.distinct, t.shape) == (2, 1, 2, (4, 1))
    assert t.mse == pytest.approx((0.1**2 + 0.2**2) / 4, rel=1e-5)
    assert net[0].weight.flatten().tolist() == pytest.approx([0.0, 0.0, 1.2, 1.2])


def test_convert_reestimates_batchnorm_statistics_in_eval_mode_for_dropout():
    net = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.9), nn.BatchNorm1d(5))
    qareg.prepare(net, k=2)
    data = torch.randn(64, 3) * 3 + 1
    qareg.convert(net, bn_batches=[data[:32], data[32:]])
    with torch.no_grad():
        features = net[0](data)
    assert torch.allclose(net[2].running_mean, features.mean(0), atol=1e-5)
    assert net.training  # the mode the model was in


def test_convert_warns_when_batchnorm_is_not_reestimated():
    net = qareg.prepare(small_net(), k=4)
    with pytest.warns(UserWarning, match="batch-norm statistics were not re-estimated"):
        qareg.convert(net)


def test_prepare_like_restores_a_prepared_state_dict():
    net = qareg.prepare(small_net(), k=5, k_per_tensor={"3.weight": 3})
    fresh = prepare_like(small_net(), net.state_dict())
    fresh.load_state_dict(net.state_dict())
    assert {t.name: t.codebook.k for t in quantized_tensors(fresh)} == {
        t.name: t.codebook.k for t in quantized_tensors(net)
    }


def test_regularization_term_falls_during_training():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    qareg.prepare(net, k=4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.randn(128, 20), torch.randint(0, 3, (128,))
    history = []
    for _ in range(100):
        reg = qareg.penalty(net)
        loss = nn.functional.cross_entropy(net(x), y) + 10.0 * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(reg.item())
    assert history[-1] < 0.02 * history[0]
    for t in quantized_tensors(net):  # representatives remain sorted and distinct
        reps = t.codebook.representatives()
        assert (reps[1:] > reps[:-1]).all()
