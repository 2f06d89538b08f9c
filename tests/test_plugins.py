"""A method defined outside the package, here in this file, runs in `qareg train`,
`qareg bench` and `qareg.bench.Bench` with no edit to qareg (the public extension
contract; see the README's "Adding a method")."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from qareg.bench import Bench, BenchConfig
from qareg.checkpoint import load_checkpoint
from qareg.cli import main
from qareg.errors import ConfigError
from qareg.methods import Method, create_method, list_methods, register_method
from qareg.methods.base import Progress
from qareg.quantize import select_tensors

THIS_FILE = str(Path(__file__).resolve())


@dataclass(frozen=True)
class QuantileOptions:
    spread: float = 1.0  # the grid spans these central quantiles' share of the weights


@register_method
class QuantileGrid(Method):
    """The smallest plug-in: post-training, `finalize` only. Each tensor's grid is 2**bits
    of its quantiles; the harness snaps the weights to it."""

    name = "test-quantile-grid"
    config_class = QuantileOptions
    post_training = True

    def finalize(self, model, bits, calibration=None):
        grids = {}
        for name in select_tensors(model):
            w = model.get_parameter(name).detach().flatten()
            half = self.config.spread / 2
            levels = torch.linspace(0.5 - half, 0.5 + half, 2 ** bits, dtype=w.dtype)
            grids[name] = torch.quantile(w, levels).unique()
        return grids


@register_method("test-shrink", recipe={"optimizer": "sgd", "lr": 0.02})
class ShrinkToZero(Method):
    """A training-time plug-in with a regularizer of its own: the L2 norm of the weights,
    then a 1-bit sign grid; registered with arguments, and a fine-tuning recipe of its own."""

    def lam(self, progress: Progress) -> float:
        return 1e-3

    def regularizer(self, model, task_loss, progress):
        return sum(model.get_parameter(n).square().sum() for n in select_tensors(model))

    def finalize(self, model, bits, calibration=None):
        return {n: torch.tensor([-1.0, 1.0]) * model.get_parameter(n).detach().abs().mean()
                for n in select_tensors(model)}


def test_the_methods_of_this_file_are_registered():
    assert {"test-quantile-grid", "test-shrink"} <= set(list_methods())
    assert QuantileGrid.trains_in_full_precision() and not ShrinkToZero.trains_in_full_precision()


def test_a_method_recipe_is_its_fine_tuning_in_the_bench_and_the_cli(fashion_dir, tmp_path,
                                                                      capsys):
    shrink, grid = (create_method(n) for n in ("test-shrink", "test-quantile-grid"))
    config = BenchConfig()
    assert (config.method_training(shrink, 0).optimizer, config.method_training(shrink, 0).lr
            ) == ("sgd", 0.02)
    assert config.method_training(grid, 0).optimizer == "adam"  # the common recipe
    assert BenchConfig(lr=0.1).method_training(shrink, 0).lr == 0.1  # one lr for all
    fp = tmp_path / "fp.pt"
    common = ["--data-dir", str(fashion_dir), "--val-size", "200", "--epochs", "1",
              "--no-progress"]
    assert main(["train", "--model", "lenet5", *common, "--out", str(fp)]) == 0
    assert "recipe: 1 epoch, sgd lr 0.05" in capsys.readouterr().out  # from scratch
    assert main(["train", "--method", "test-shrink", "--bits", "1", "--init-from", str(fp),
                 *common, "--out", str(tmp_path / "s.pt")]) == 0
    assert "recipe: 1 epoch, sgd lr 0.02" in capsys.readouterr().out  # fine-tuning
    assert main(["train", "--method", "qareg", "--init-from", str(fp), *common,
                 "--out", str(tmp_path / "q.pt")]) == 0
    assert "recipe: 1 epoch, adam lr 0.001" in capsys.readouterr().out


def test_another_class_cannot_take_a_registered_name():
    with pytest.raises(ConfigError, match="method name 'lsq' is taken"):
        @register_method
        class Impostor(Method):
            name = "lsq"


def test_bench_runs_a_method_of_this_file(fashion_dir, tmp_path):
    config = BenchConfig(model="lenet5", methods=("test-quantile-grid", "test-shrink"),
                         bits=(1, 2), seeds=(0,), pretrain_epochs=1, epochs=1, batch_size=64,
                         val_size=200, data_dir=str(fashion_dir), augment=False,
                         method_configs={"test-quantile-grid": {"spread": 0.8}})
    rows = Bench(config, tmp_path / "r.jsonl", progress=False).run()
    by_key = {(r["method"], r["bits"]): r for r in rows}
    assert set(by_key) == {("fp", 32), ("test-quantile-grid", 1), ("test-quantile-grid", 2),
                           ("test-shrink", 1), ("test-shrink", 2)}
    assert by_key[("test-quantile-grid", 2)]["config"] == {"spread": 0.8}
    assert by_key[("test-quantile-grid", 2)]["distinct_values"] <= 4
    assert by_key[("test-shrink", 1)]["distinct_values"] <= 2
    assert by_key[("test-quantile-grid", 2)]["accuracy"] > 50  # the fixture is easy


def test_cli_train_and_bench_run_a_plugin_file(fashion_dir, tmp_path, capsys):
    out = tmp_path / "plugin.pt"
    argv = ["train", "--plugin", THIS_FILE, "--method", "test-quantile-grid", "--bits", "2",
            "--spread", "0.9", "--data-dir", str(fashion_dir), "--val-size", "200",
            "--epochs", "1", "--batch-size", "64", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert "options: spread=0.9" in capsys.readouterr().out
    model, meta = load_checkpoint(out)
    assert meta["method"] == "test-quantile-grid" and meta["converted"]
    assert meta["config"]["method"] == {"spread": 0.9}
    for name in select_tensors(model):
        assert model.get_parameter(name).unique().numel() <= 4, name
    shrunk = tmp_path / "shrink.pt"
    assert main([*argv[:4], "test-shrink", "--bits", "1", *argv[9:-1], str(shrunk)]) == 0
    assert load_checkpoint(shrunk)[1]["converted"]

    results = tmp_path / "bench.jsonl"
    assert main(["bench", "--plugin", THIS_FILE, "--methods", "test-quantile-grid",
                 "--bits", "2", "--seeds", "0", "--pretrain-epochs", "1", "--epochs", "1",
                 "--batch-size", "64", "--val-size", "200", "--data-dir", str(fashion_dir),
                 "--no-augment", "--no-progress", "--out", str(results)]) == 0
    methods = [json.loads(line)["method"] for line in results.read_text().splitlines()]
    assert methods == ["fp", "test-quantile-grid"]


def test_a_bad_plugin_file_is_named(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    assert main(["train", "--plugin", str(broken), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "broken.py' failed to load: RuntimeError: boom" in err
    assert main(["train", "--plugin", str(tmp_path / "none.txt"), "--out", "x.pt"]) == 2
    assert "must be a Python file" in capsys.readouterr().err
