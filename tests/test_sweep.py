"""qareg sweep: one stored network quantized after training at several bit-widths."""

import copy
import json
from itertools import islice

import pytest

from qareg.activations import quantize_activations
from qareg.cli import main
from qareg.config import TrainConfig
from qareg.data import load_dataset
from qareg.evaluation import bn_loader, evaluate
from qareg.runs import load_run
from qareg.uniform import quantize_weights_


@pytest.fixture(scope="module")
def trained(fashion_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QAREG_DATA", str(fashion_dir))
        assert main(["train", "--model", "lenet5", "--epochs", "1", "--val-size", "200",
                     "--no-progress", "--out", str(folder / "fp.pt")]) == 0
    return folder / "fp.pt"


def by_hand(checkpoint, fashion_dir, bits: int, act_bits: int | None) -> float:
    """Quantize the checkpoint's network with the library's pieces, as the docs describe."""
    model, _ = load_run(checkpoint)
    splits = load_dataset("fashion-mnist", str(fashion_dir), val_size=200)
    batches = list(islice(bn_loader(splits, TrainConfig(model="lenet5", seed=0)), 8))
    quantized = copy.deepcopy(model)
    quantize_weights_(quantized, bits, per_channel=False, clip_ratios=100)
    if act_bits is not None:
        quantize_activations(quantized, act_bits, batches, 99.99)
    return evaluate(quantized, splits.test, splits)


@pytest.mark.parametrize("act", ["none", "same"])
def test_the_sweep_matches_quantizing_by_hand(trained, fashion_dir, tmp_path, capsys, act,
                                              monkeypatch):
    monkeypatch.setenv("QAREG_DATA", str(fashion_dir))
    out = tmp_path / "sweep.jsonl"
    assert main(["sweep", str(trained), "--bits", "8", "4", "2", "--act-bits", act,
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["bits"] for r in rows] == [8, 4, 2]
    printed = capsys.readouterr().out
    for row in rows:
        assert row["act_bits"] == (row["bits"] if act == "same" else None)
        assert row["accuracy"] == by_hand(trained, fashion_dir, row["bits"], row["act_bits"])
        assert f"{row['accuracy']:.2f}" in printed
    assert rows[0]["accuracy"] > rows[2]["accuracy"]  # 2 bits, post-training, loses


def test_the_sweep_refuses_what_it_cannot_do(trained, fashion_dir, tmp_path, capsys,
                                             monkeypatch):
    monkeypatch.setenv("QAREG_DATA", str(fashion_dir))
    assert main(["sweep", str(trained), "--bits", "4", "4"]) == 2
    assert "must not repeat" in capsys.readouterr().err
    assert main(["sweep", str(trained), "--bits", "1", "--act-bits", "same"]) == 2
    assert "activation_bits must be an integer from 2 to 8, got 1" in capsys.readouterr().err
    out = tmp_path / "exists.jsonl"
    out.write_text("keep\n")
    assert main(["sweep", str(trained), "--out", str(out)]) == 2
    assert out.read_text() == "keep\n"
