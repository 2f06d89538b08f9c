import copy
import math

import pytest
import torch
from torch.nn.utils import parametrize

import qareg
from qareg.config import TrainConfig
from qareg.engine import bn_loader, evaluate, train
from qareg.errors import ConfigError
from qareg.methods.base import Progress
from qareg.methods.cpq import (
    CPQConfig,
    CPQMethod,
    CPQQuantizer,
    bit_widths,
    cpq_quantize,
    cpq_quantizers,
    fit_grid,
    gate_log_alpha,
    grid_index,
    grid_levels,
    interval_log_probs,
    level_masks,
    sample_gates,
)


def explicit_probs(w, grid, step, sigma):
    """(N, K) relaxed-quantization bin probabilities written out with sigmoids."""
    w = w.reshape(-1, 1)
    upper = torch.sigmoid((grid + step / 2 - w) / sigma)
    lower = torch.sigmoid((grid - step / 2 - w) / sigma)
    upper = torch.cat([upper[:, :-1], torch.ones_like(upper[:, -1:])], 1)  # last bin to +inf
    lower = torch.cat([torch.zeros_like(lower[:, :1]), lower[:, 1:]], 1)  # first bin from -inf
    return upper - lower


def small_problem(seed=0, bits=3, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.8
    step = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    offset = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.14, dtype=torch.float64, requires_grad=True)
    return w.requires_grad_(), step, offset, sigma, grid_index(bits)


def test_config_validation():
    CPQConfig()
    with pytest.raises(ConfigError, match="drop_rate"):
        CPQConfig(drop_rate=0.9)
    with pytest.raises(ConfigError, match="sigma_init"):
        CPQConfig(sigma_init=0.0)
    with pytest.raises(ConfigError, match="dropbits"):
        CPQConfig(lam_bits=0.1, dropbits=False)
    with pytest.raises(ConfigError, match="bits"):
        CPQMethod().prepare(qareg.create_model("lenet5", 10, 1, 28), None, 0)


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_levels_nest_into_coarser_grids(bits):
    index, levels = grid_index(bits), grid_levels(bits)
    assert levels.bincount(minlength=bits + 1)[1:].tolist() == [2] + [
        2 ** (k - 1) for k in range(2, bits + 1)]
    for k in range(1, bits + 1):
        # the points of levels <= k are the k-bit grid with 2^(bits-k) times the step
        kept = index[levels <= k]
        assert torch.equal(kept, grid_index(k) * 2 ** (bits - k))


def test_log_probs_match_the_sigmoid_formula_and_stay_finite():
    w, step, offset, sigma, index = small_problem()
    grid = step * index + offset
    log_p = interval_log_probs(w, grid, step, sigma)
    assert torch.allclose(log_p.exp(), explicit_probs(w, grid, step, sigma), atol=1e-12)
    assert torch.allclose(log_p.exp().sum(1), torch.ones(w.numel(), dtype=w.dtype))
    far = torch.tensor([-50.0, 60.0], dtype=torch.float64)  # sigmoids saturate: log space holds
    assert torch.isfinite(interval_log_probs(far, grid, step, sigma * 0.01)).all()


def test_fit_grid_beats_covering_the_range():
    w = torch.randn(4000, generator=torch.Generator().manual_seed(1))
    w[0] = 12.0  # an outlier that a range-covering grid would waste its steps on
    for bits in (1, 2, 4):
        step, offset = fit_grid(w, bits)
        index = grid_index(bits).float()

        def mse(step, offset, index=index):
            points = step * index + offset
            return (w[:, None] - points).abs().min(1).values.square().mean()

        cover = (w.max() - w.min()) / (2 ** bits - 1)
        assert step > 0
        assert mse(step, offset) < mse(cover, w.min() + 2 ** (bits - 1) * cover)


@pytest.mark.parametrize("training", [True, False])
def test_forward_values_lie_on_the_grid(training):
    torch.manual_seed(0)
    w = torch.randn(40, 30) * 0.1
    q = CPQQuantizer(w, 3, CPQConfig(drop_rate=0.3)).train(training)
    y = q(w)
    step, offset = q.log_step.exp(), q.offset
    i = (y - offset) / step
    assert torch.allclose(i, i.round(), atol=1e-4)
    assert i.round().min() >= -4 and i.round().max() <= 3
    assert (y.reshape(-1, 1) == q.grid()).any(1).all()
    assert y.unique().numel() > 2  # not degenerate


def test_forward_is_the_mode_of_the_masked_probabilities():
    w, step, offset, sigma, index = small_problem(seed=3)
    mask = torch.tensor([1, 0.0, 0.6, 0.0, 1, 0.0, 0.6, 0.0], dtype=torch.float64)
    y = cpq_quantize(w, step, offset, sigma, mask, index)
    grid = step * index + offset
    expected = grid[(explicit_probs(w, grid, step, sigma) * mask).argmax(1)]
    assert torch.equal(y.reshape(-1), expected)


@pytest.mark.parametrize("mask", [[1.0] * 8, [1, 0.3, 0.8, 0.0, 1, 0.3, 0.8, 0.0]])
def test_multiclass_ste_matches_the_hand_reference(mask):
    w, step, offset, sigma, index = small_problem(seed=4)
    mask = torch.tensor(mask, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(5),
                           dtype=torch.float64)  # dL/dy
    leaves = (w, step, offset, sigma, mask)
    y = cpq_quantize(w, step, offset, sigma, mask, index)
    got = torch.autograd.grad((upstream * y).sum(), leaves)
    # reference: sum_n dL/dy_n * (sum_i g_i * m_i * pi_i(w_n) + g_mode(n)), g_i held constant
    # in the first term (the one-hot's gradient dL/dy * g_i goes to the unnormalised pi_i)
    grid = step * index + offset
    probs = explicit_probs(w, grid, step, sigma) * mask  # (N, K)
    mode = probs.detach().argmax(1)
    c = upstream.reshape(-1, 1)
    reference = (c * grid.detach() * probs).sum() + (c.view(-1) * grid[mode]).sum()
    want = torch.autograd.grad(reference, leaves)
    for name, a, b in zip(("w", "step", "offset", "sigma", "mask"), got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name
        assert a.abs().sum() > 0, name
    # not the plain straight-through estimator (dL/dw = dL/dy): the routing shapes it
    assert not torch.allclose(got[0], upstream, atol=1e-3)


def test_every_quantizer_parameter_gets_gradient():
    torch.manual_seed(1)
    w = (torch.randn(20, 10) * 0.1).requires_grad_()
    q = CPQQuantizer(w.detach(), 3, CPQConfig(lam_bits=0.1, drop_rate=0.3)).train()
    torch.manual_seed(2)
    for _ in range(4):  # a gate learns from the draws where its relaxed value is inside (0, 1)
        q(w).square().sum().backward()
    for p in (w, q.log_step, q.offset, q.log_sigma, q.gate_logits):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("rate", [0.1, 0.35])
def test_gates_close_at_the_configured_rate(rate):
    torch.manual_seed(0)
    z = sample_gates(torch.full((20000, 3), gate_log_alpha(rate)))
    closed = (z == 0).double().mean(0)
    assert torch.allclose(closed, torch.full_like(closed, rate), atol=0.015)
    # nested masks: level k (k = 2..4) is dropped unless all gates 2..k are open
    dropped = (torch.stack([level_masks(row) for row in z[:4000]]) == 0).double().mean(0)
    expected = torch.tensor([1 - (1 - rate) ** (k - 1) for k in range(1, 5)], dtype=torch.float64)
    assert torch.allclose(dropped, expected, atol=0.03)


def test_dropped_levels_are_never_chosen():
    torch.manual_seed(0)
    w = torch.randn(50, 20) * 0.1
    q = CPQQuantizer(w, 4, CPQConfig(drop_rate=0.4)).train()
    dropped_seen = 0
    for seed in range(60):
        torch.manual_seed(seed)
        mask = q.point_mask(q.gates())  # the draw q(w) makes with this seed
        assert ((mask == 0) | (mask == 1)).all()  # hard in the forward pass
        torch.manual_seed(seed)
        y = q(w)
        chosen = (y.reshape(-1, 1) == q.grid()).any(0)  # (K,) points used
        assert not (chosen & (mask == 0)).any()
        dropped_seen += int((mask == 0).any())
    assert dropped_seen > 20  # the check above did meet dropped levels
    q.eval()  # at init the deterministic gates keep every level
    assert torch.equal(q.point_mask(q.gates()), torch.ones(16))


def test_bit_width_penalty_closes_gates():
    model = qareg.create_model("lenet5", 10, 1, 28)
    method = CPQMethod(CPQConfig(lam_bits=1.0))
    method.prepare(model, 3, seed=0)
    assert set(bit_widths(model).values()) == {3}
    groups = method.param_groups(model)
    gates = groups[1]["params"]
    assert len(gates) == 5 and all(g.shape == (2,) for g in gates)
    start = torch.cat([g.detach().clone() for g in gates])
    optimizer = torch.optim.Adam(gates, lr=0.1)
    progress = Progress(0, 1, 1, 1)
    penalties = []
    for _ in range(40):
        loss = method.lam(progress) * method.regularizer(model, torch.zeros(()), progress)
        penalties.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (torch.cat([g.detach() for g in gates]) < start).all()
    assert penalties[-1] < penalties[0]
    assert set(bit_widths(model).values()) == {1}
    grids = method.finalize(model, 3)
    assert all(grid.numel() == 2 for grid in grids.values())
    for name, param in model.named_parameters():
        if name in grids:
            assert torch.isin(param.unique(), grids[name]).all()


def test_frozen_gates_without_the_penalty():
    model = qareg.create_model("lenet5", 10, 1, 28)
    method = CPQMethod(CPQConfig(lam_bits=0.0))
    method.prepare(model, 2, seed=0)
    assert method.param_groups(model)[1]["params"] == []
    assert all(not isinstance(q.gate_logits, torch.nn.Parameter)
               for _, _, _, q in cpq_quantizers(model))
    grids = method.finalize(model, 1)  # fewer bits than prepared: levels above 1 dropped
    assert all(grid.numel() == 2 for grid in grids.values())
    with pytest.raises(ConfigError, match="prepared for 2 bits"):
        method.finalize(qareg.create_model("lenet5", 10, 1, 28), 3)


def test_finalizing_a_copy_leaves_the_original_intact():
    model = qareg.create_model("lenet5", 10, 1, 28)
    method = CPQMethod()
    method.prepare(model, 2, seed=0)
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    before = model(x)
    twin = copy.deepcopy(model)
    copy.deepcopy(method).finalize(twin, 2)
    assert not any(parametrize.is_parametrized(m) for m in twin.modules())
    assert torch.equal(model(x), before)  # still parametrized, same outputs
    assert torch.equal(twin(x), before)  # finalized weights are the eval-mode forward's
    method.finalize(model, 2)
    assert torch.equal(model(x), before)


def test_end_to_end_lenet5(tiny_splits):
    bits = 3
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    method = CPQMethod(CPQConfig())
    method.prepare(model, bits, seed=0)
    config = TrainConfig(model="lenet5", epochs=1, optimizer="adam", lr=1e-3, batch_size=64)
    history = train(model, tiny_splits, config, method=method, progress=False, augment=False)
    assert history[-1].val_accuracy_quantized is not None  # the engine's deepcopy + snap ran

    twin = copy.deepcopy(model)  # a prepared model survives deepcopy, quantizers included
    model.eval()
    twin.eval()
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), twin(x))

    calibration = bn_loader(tiny_splits, config)
    report = method.convert(model, bits, calibration)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert len(report.tensors) == 5
    for t in report.tensors:
        param = model.get_parameter(t.name)
        assert param.unique().numel() <= 2 ** bits
    accuracy = evaluate(model, tiny_splits.test, tiny_splits)
    assert accuracy > 2.5 * 100 / tiny_splits.num_classes, accuracy  # 16 steps: ~44%
    assert math.isclose(accuracy, evaluate(twin, tiny_splits.test, tiny_splits), abs_tol=5.0)


def test_engine_trains_the_gates_under_lam_bits(tiny_splits):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    method = CPQMethod(CPQConfig(lam_bits=1.0, gate_lr_scale=100.0))
    method.prepare(model, 3, seed=0)
    start = {n: q.gate_logits.detach().clone() for n, _, _, q in cpq_quantizers(model)}
    config = TrainConfig(model="lenet5", epochs=1, optimizer="adam", lr=1e-3, batch_size=64)
    history = train(model, tiny_splits, config, method=method, progress=False, augment=False)
    assert history[-1].lam == 1.0 and history[-1].penalty > 0
    for name, _, _, q in cpq_quantizers(model):
        assert (q.gate_logits < start[name]).all(), name


def test_training_is_repeatable_on_two_threads_whatever_ran_before(tiny_splits):
    """The gates' draws restart from the config's seed, and the estimator's sums do not
    depend on how threads split them: two runs give the same weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        states = []
        for noise in (0, 1000):
            torch.manual_seed(0)
            model = qareg.create_model("lenet5", 10, 1, 28)
            method = CPQMethod(CPQConfig(drop_rate=0.3))
            method.prepare(model, 2, seed=0)
            torch.rand(noise)  # whatever the process drew before training
            config = TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=1e-3)
            train(model, tiny_splits, config, method, progress=False, augment=False)
            states.append(model.state_dict())
    finally:
        torch.set_num_threads(threads)
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


def test_a_larger_lam_bits_learns_fewer_bits(tiny_splits, tmp_path):
    """Learned bit-widths (issue 14): the same training with a stronger bit-drop penalty
    ends with fewer average bits and a smaller stored file."""
    from qareg.compress import save_compressed

    average, sizes = {}, {}
    for lam_bits in (1e-4, 1.0):  # Adam moves gates by ~lr a step: a large gate lr
        torch.manual_seed(0)
        model = qareg.create_model("lenet5", 10, 1, 28)
        method = CPQMethod(CPQConfig(lam_bits=lam_bits, gate_lr_scale=1000.0))
        method.prepare(model, 4, seed=0)
        config = TrainConfig(model="lenet5", epochs=2, optimizer="adam", lr=1e-3,
                             batch_size=64)
        train(model, tiny_splits, config, method=method, progress=False, augment=False)
        widths = bit_widths(model)
        plain = qareg.create_model("lenet5", 10, 1, 28)
        sizes_of = {n: plain.get_parameter(n).numel() for n in widths}
        average[lam_bits] = sum(widths[n] * sizes_of[n] for n in widths) / sum(
            sizes_of.values())
        method.convert(model, 4, bn_loader(tiny_splits, config))
        sizes[lam_bits] = save_compressed(model, tmp_path / f"{lam_bits}.qz").file_bytes
    assert average[1.0] < average[1e-4] <= 4, average
    assert sizes[1.0] < sizes[1e-4], sizes
