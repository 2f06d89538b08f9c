"""Quantized layer inputs: at most 2^A values, trained with the weights, saved and loaded."""

import copy
import json

import pytest
import torch

import qareg
from qareg.act_quant import InputQuantizer, attach_input_quantizers, input_quantizers
from qareg.cli import main
from qareg.compress import load_compressed, save_compressed
from qareg.config import TrainConfig
from qareg.engine import convert_with_data, make_optimizer, train
from qareg.errors import ConfigError
from qareg.methods import create_method
from qareg.methods.cpq import CPQInputQuantizer


def inputs_seen(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each layer receives (after its quantizer) on `x`."""
    seen = {}
    hooks = [q.register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out))
             for n, q in input_quantizers(model).items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_a_batch_of_inputs_takes_at_most_2_to_the_a_values(bits):
    torch.manual_seed(0)
    model = qareg.create_model("cnn4", 10, 1, 28)
    x = torch.randn(32, 1, 28, 28)
    attach_input_quantizers(model, bits, [x])
    seen = inputs_seen(model, torch.randn(32, 1, 28, 28))
    assert set(seen) == {n for n, m in model.named_modules()
                         if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    for name, values in seen.items():
        assert values.unique().numel() <= 2 ** bits, name
    quantizers = input_quantizers(model)
    assert quantizers["features.0"].signed.item()  # inputs with negative values: signed grid
    assert not quantizers["classifier.0"].signed.item()  # after a ReLU: unsigned


def test_steps_learn_without_weight_decay(tiny_splits):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    config = TrainConfig(model="lenet5", epochs=1, optimizer="adam", lr=1e-3, batch_size=64,
                         act_bits=4)
    history = train(model, tiny_splits, config, None, augment=False, progress=False)
    quantizers = input_quantizers(model)
    assert len(quantizers) == 5 and history[-1].val_accuracy > 20
    steps = {id(q.step) for q in quantizers.values()}
    groups = make_optimizer(model, config, None).param_groups
    for group in groups:
        if any(id(p) in steps for p in group["params"]):
            assert group["weight_decay"] == 0


def test_a_file_with_input_quantizers_loads_to_identical_outputs(tiny_splits, tmp_path):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    method = create_method("qareg")
    method.prepare(model, 2, seed=0)
    config = TrainConfig(model="lenet5", epochs=1, optimizer="adam", lr=1e-3, batch_size=64,
                         act_bits=3)
    train(model, tiny_splits, config, method, augment=False, progress=False)
    convert_with_data(model, tiny_splits, config, method)
    save_compressed(model, tmp_path / "m.qz")
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        expected = model.eval()(x)
        for packed in (False, True):
            loaded = load_compressed(tmp_path / "m.qz", packed=packed).eval()
            assert torch.equal(loaded(x), expected)
            assert all(isinstance(q, InputQuantizer) for q in input_quantizers(loaded).values())
    twin = copy.deepcopy(model)  # a deep copy keeps the hooks too
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), expected)


def test_train_act_bits_through_the_command_line(fashion_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QAREG_DATA", str(fashion_dir))
    out, qz = tmp_path / "q.pt", tmp_path / "q.qz"
    assert main(["train", "--method", "qareg", "--bits", "2", "--act-bits", "4", "--epochs",
                 "1", "--val-size", "200", "--no-progress", "--out", str(out)]) == 0
    assert main(["compress", str(out), str(qz)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    from_checkpoint = capsys.readouterr().out
    assert main(["evaluate", str(qz), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == json.loads(
        from_checkpoint)["accuracy"]
    assert main(["train", "--act-bits", "1", "--out", str(tmp_path / "x.pt")]) == 2
    assert "act_bits must be an integer from 2 to 16, got 1" in capsys.readouterr().err


def test_a_w_a_bench_quantizes_the_training_methods_inputs_only(fashion_dir, tmp_path):
    from qareg.bench import Bench, BenchConfig

    config = BenchConfig(model="lenet5", methods=("ptq-kmeans", "qareg", "lsq"), bits=(2,),
                         seeds=(0,), pretrain_epochs=1, epochs=1, batch_size=64,
                         val_size=200, data_dir=str(fashion_dir), augment=False, act_bits=4)
    assert config.skipped() == [("ptq-kmeans", 2)]
    rows = {r["method"]: r for r in Bench(config, tmp_path / "r.jsonl", progress=False).run()}
    assert set(rows) == {"fp", "qareg", "lsq"}
    assert rows["fp"]["train"]["act_bits"] is None  # the reference stays full precision
    assert rows["qareg"]["train"]["act_bits"] == rows["lsq"]["train"]["act_bits"] == 4
    assert rows["qareg"]["recipe"]["act_bits"] == 4


def test_cpq_trains_its_own_activation_path_and_files_keep_it(tiny_splits, tmp_path):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    method = create_method("cpq", {"activations": True})
    method.prepare(model, 2, seed=0)
    config = TrainConfig(model="lenet5", epochs=2, optimizer="adam", lr=1e-3, batch_size=64,
                         act_bits=3)
    history = train(model, tiny_splits, config, method, augment=False, progress=False)
    quantizers = input_quantizers(model)
    assert len(quantizers) == 5 and all(isinstance(q, CPQInputQuantizer)
                                        for q in quantizers.values())
    assert history[-1].val_accuracy > 40  # 69 measured; 10 classes
    assert all(q.offset.item() != 0 for q in quantizers.values())  # the grid learned
    x = torch.randn(8, 1, 28, 28)
    for name, values in inputs_seen(model.eval(), x).items():
        assert values.unique().numel() <= 2 ** 3, name
    convert_with_data(model, tiny_splits, config, method)
    save_compressed(model, tmp_path / "m.qz")
    with torch.no_grad():
        expected = model.eval()(x)
        for packed in (False, True):
            loaded = load_compressed(tmp_path / "m.qz", packed=packed).eval()
            assert torch.equal(loaded(x), expected)
            assert all(isinstance(q, CPQInputQuantizer)
                       for q in input_quantizers(loaded).values())


def test_cpq_activations_without_act_bits_say_what_to_give(tiny_splits):
    model = qareg.create_model("lenet5", 10, 1, 28)
    method = create_method("cpq", {"activations": True})
    method.prepare(model, 2, seed=0)
    with pytest.raises(ConfigError, match="give --act-bits A"):
        train(model, tiny_splits, TrainConfig(epochs=1), method, progress=False)
