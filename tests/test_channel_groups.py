"""Grouped codebooks: one row of representatives per group of output channels and a fixed
scale per channel, through the penalty, snapped forward passes, convert, checkpoints,
compressed files (dense and packed) and ONNX."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qareg
from qareg.channel_groups import group_bounds, group_count, lookup
from qareg.checkpoint import load_checkpoint, save_checkpoint
from qareg.compress import load_compressed, save_compressed
from qareg.compress.io import read_contents
from qareg.config import TrainConfig
from qareg.engine import train
from qareg.errors import ConfigError
from qareg.methods import create_method
from qareg.methods.qareg import QaregConfig
from qareg.quantize import quantized_tensors
from qareg.straight_through import straight_through


def lenet(group_size=4, channel_scale=True, k=4, seed=0):
    torch.manual_seed(seed)
    model = qareg.create_model("lenet5", 10, 1, 28)
    return qareg.prepare(model, k, group_size=group_size, channel_scale=channel_scale)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300))
def test_groups_are_consecutive_cover_every_channel_and_differ_by_one_at_most(channels, size):
    groups = group_count(channels, size)
    bounds = group_bounds(channels, groups)
    assert bounds[0][0] == 0 and bounds[-1][1] == channels
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [end - first for first, end in bounds]
    assert max(sizes) <= size and max(sizes) - min(sizes) <= 1


def test_lookup_reads_each_channel_s_row_and_scale():
    table = torch.tensor([[0.0, 1.0], [10.0, 20.0]])
    indices = torch.tensor([[0, 1], [1, 1], [1, 0]])  # 3 channels: groups [0, 1], [2]
    scales = torch.tensor([1.0, 2.0, 3.0])
    expected = torch.tensor([[0.0, 1.0], [2.0, 2.0], [60.0, 30.0]])
    assert torch.equal(lookup(table, indices, scales), expected)
    assert torch.equal(lookup(table[0], indices), table[0][indices])  # plain: a gather


def test_each_group_snaps_to_its_own_row_times_its_channel_scale():
    model = lenet(group_size=4)
    report = qareg.convert(model)
    for t in quantized_tensors(model):
        codebook, weight = t.codebook, t.weight.detach()
        assert codebook.groups == group_count(weight.shape[0], 4)
        rows = codebook.representatives().detach()
        for g, (first, end) in enumerate(group_bounds(weight.shape[0], codebook.groups)):
            for c in range(first, end):
                allowed = rows[g] * codebook.channel_scale[c]
                assert torch.isin(weight[c], allowed).all()
    assert all(r.distinct <= 4 for r in report.tensors)


def test_snapped_forward_is_convert_s_network_and_gradients_reach_both():
    model = lenet()
    x = torch.randn(4, 1, 28, 28)
    with straight_through(model):
        snapped_out = model(x)
    snapped_out.square().sum().backward()
    for t in quantized_tensors(model):
        assert t.weight.grad is not None and t.codebook.normalized.grad.abs().sum() > 0
    converted = copy.deepcopy(model)
    qareg.convert(converted)
    assert torch.equal(converted(x), snapped_out)


def test_the_penalty_pulls_each_group_toward_its_row():
    model = lenet(group_size=8)
    start = qareg.penalty(model).item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        qareg.penalty(model).backward()
        optimizer.step()
    assert qareg.penalty(model).item() < 0.2 * start


@pytest.mark.parametrize("group_size, channel_scale", [(4, True), (5, False), (0, True)])
def test_files_round_trip_bit_identically_dense_and_packed(tmp_path, group_size,
                                                           channel_scale):
    model = lenet(group_size, channel_scale)
    qareg.convert(model)
    info = save_compressed(model, tmp_path / "m.qz")
    x = torch.randn(5, 1, 28, 28)
    expected = model(x)
    assert torch.equal(load_compressed(tmp_path / "m.qz")(x), expected)
    assert torch.equal(load_compressed(tmp_path / "m.qz", packed=True)(x), expected)
    assert (tmp_path / "m.qz").read_bytes()[8:10] == b"\x03\x00"  # format 3
    contents, _ = read_contents(tmp_path / "m.qz")
    tensors = quantized_tensors(model)
    scale_bytes = sum(t.weight.shape[0] * 4 for t in tensors) if channel_scale else 0
    assert info.codebook_bytes == sum(t.codebook.normalized.numel() * 4
                                      for t in tensors) + scale_bytes
    assert set(contents.channel_scales) == ({t.name for t in tensors} if channel_scale else set())
    assert [t.groups for t in info.tensors] == [t.codebook.groups for t in tensors]
    assert "codebook B" in info.format_table()


def test_plain_codebooks_still_write_format_2(tmp_path):
    model = lenet(group_size=0, channel_scale=False)
    qareg.convert(model)
    save_compressed(model, tmp_path / "m.qz")
    assert (tmp_path / "m.qz").read_bytes()[8:10] == b"\x02\x00"


def test_checkpoints_restore_grouped_codebooks(tmp_path):
    model = lenet(group_size=5)
    save_checkpoint(tmp_path / "m.pt", model, {"seed": 0})
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(3, 1, 28, 28)
    with straight_through(model):
        expected = model(x)
    with straight_through(loaded):
        assert torch.equal(loaded(x), expected)
    assert [t.codebook.groups for t in quantized_tensors(loaded)] == [
        t.codebook.groups for t in quantized_tensors(model)]


def test_onnx_export_rebuilds_grouped_weights(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from qareg.onnx_export import export_onnx

    model = lenet(group_size=4)
    qareg.convert(model)
    save_compressed(model, tmp_path / "m.qz")
    export_onnx(tmp_path / "m.qz", tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    x = torch.randn(3, 1, 28, 28)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(out - model(x).detach().numpy()).max() < 1e-5


def test_qareg_trains_with_grouped_codebooks(tiny_splits):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    method = create_method("qareg", {"group_size": 8, "channel_scale": True})
    method.prepare(model, 2, seed=0)
    history = train(model, tiny_splits, TrainConfig(epochs=2, batch_size=32, optimizer="adam",
                                                    lr=1e-3), method, progress=False)
    assert all(t.codebook.groups > 1 or t.weight.shape[0] <= 8
               for t in quantized_tensors(model))
    assert history[-1].val_accuracy_quantized > 50  # 10 classes: it learned, snapped
    assert qareg.convert(model).bits_per_weight == 2  # bits 2: k = 4


def test_a_budget_with_grouped_codebooks_is_refused_before_training():
    with pytest.raises(ConfigError, match="group_size 0"):
        QaregConfig(budget=1.0, group_size=4)
    method = create_method("qareg", {"channel_scale": True})
    with pytest.raises(ConfigError, match="plain codebooks"):
        method.prepare(qareg.create_model("lenet5", 10, 1, 28), 0.75, seed=0)


def test_bad_group_sizes_are_named():
    with pytest.raises(ConfigError, match="group_size must be an integer >= 0, got -1"):
        QaregConfig(group_size=-1)
    with pytest.raises(ConfigError, match="smallest group"):
        lenet(group_size=1, k=200)
