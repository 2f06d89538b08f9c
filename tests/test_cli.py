import json
import subprocess
import sys

import pytest
import torch

import qareg
from qareg.cli import main

FAST = ["--epochs", "1", "--val-size", "200", "--batch-size", "64", "--no-progress"]


@pytest.fixture
def data_env(fashion_dir, monkeypatch):
    monkeypatch.setenv("QAREG_DATA", str(fashion_dir))
    return fashion_dir


def test_train_quantize_compress_evaluate_round_trip(data_env, tmp_path, capsys):
    fp, ptq, reg = (tmp_path / n for n in ("fp.pt", "ptq.pt", "reg.pt"))
    metrics = tmp_path / "metrics.jsonl"
    assert main(["train", "--model", "lenet5", "--out", str(fp), "--metrics", str(metrics),
                 *FAST]) == 0
    assert len(metrics.read_text().splitlines()) == 1
    assert (tmp_path / "fp.metrics.jsonl").exists() is False  # --metrics given: used instead
    assert main(["quantize", str(fp), "--k", "4", "--out", str(ptq)]) == 0
    assert "2.00 bits/weight" in capsys.readouterr().out
    assert main(["train", "--method", "qareg", "--init-from", str(fp), "--k", "4",
                 "--lr", "0.005", "--out", str(reg), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "adam lr 0.005" in printed  # qareg's fine-tuning recipe, its lr from the flag
    assert f"Next: qareg compress {reg}" in printed.splitlines()[-1]
    assert len((tmp_path / "reg.metrics.jsonl").read_text().splitlines()) == 1  # the default
    assert main(["evaluate", str(reg), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 300 and result["split"] == "test"
    assert result["accuracy"] > 50.0

    compressed = tmp_path / "model.qz"
    assert main(["compress", str(fp), str(compressed)]) == 2  # full precision: not quantized
    assert "run `qareg quantize" in capsys.readouterr().err and not compressed.exists()
    assert main(["compress", str(reg), str(compressed)]) == 0
    assert "compression ratio" in capsys.readouterr().out
    assert main(["inspect", str(compressed)]) == 0
    assert "model: lenet5 (in_channels=1" in capsys.readouterr().out
    assert main(["evaluate", str(compressed), "--json"]) == 0  # the same network, from the file
    assert json.loads(capsys.readouterr().out)["accuracy"] == result["accuracy"]
    assert main(["evaluate", str(compressed)]) == 0
    assert f"test accuracy {result['accuracy']:.2f}% on 300 images" in capsys.readouterr().out
    compressed.write_bytes(compressed.read_bytes()[:-10])
    assert main(["inspect", str(compressed)]) == 2
    assert "model.qz" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--method", "qareg", "--k", "1"], "k must be an integer from 2 to 65536"),
        (["train", "--model", "resnet9"], "model must be one of alexnet, cnn4, lenet5"),
        (["train", "--method", "qareg", "--lam", "-1"], "lam must be a number >= 0, got -1"),
        (["train", "--data-dir", "/nonexistent/folder"], "/nonexistent/folder"),
        (["train", "--k", "4"], "--k does not apply to --method fp"),
        (["train", "--method", "qareg", "--k", "200"],
         "k=200 is larger than tensor 'features.0.weight' with 150 entries"),
        (["train", "--method", "qareg", "--exclude", "nope.*"],
         "exclude pattern 'nope.*' matches no parameter"),
        (["train", "--init-from", "missing.pt"], "--init-from 'missing.pt' does not exist"),
        (["train", "--method", "qareg", "--layer-weights", "x=y"], "PATTERN=WEIGHT pairs"),
    ],
)
def test_bad_train_input_exits_2_names_the_value_and_writes_nothing(
    argv, message, data_env, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    out, metrics = tmp_path / "out.pt", tmp_path / "m.jsonl"
    code = main([*argv, "--val-size", "200", "--out", str(out), "--metrics", str(metrics),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert not out.exists() and not metrics.exists()


def test_missing_data_folder_names_the_folder_and_files(tmp_path, capsys):
    out = tmp_path / "out.pt"
    code = main(["train", "--data-dir", str(tmp_path / "nodata"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "nodata" in err and "train-images-idx3-ubyte.gz" in err
    assert not out.exists()


def test_yaml_config_sets_defaults_and_rejects_unknown_keys(data_env, tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  epochs: 1\n  batch_size: 64\ndata:\n  val_size: 100\n")
    out = tmp_path / "model.pt"
    assert main(["train", "--config", str(good), "--out", str(out), "--no-progress"]) == 0
    assert "recipe: 1 epoch, sgd lr 0.05 (cosine), batch 64" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    out2 = tmp_path / "model2.pt"
    assert main(["train", "--config", str(bad), "--out", str(out2)]) == 2
    err = capsys.readouterr().err
    assert f"unknown key epoch in section 'train' of config file {str(bad)!r}" in err
    assert "valid keys: model, epochs" in err
    assert not out2.exists()


def test_quantize_rejects_bad_k_and_keeps_existing_output(data_env, tmp_path, capsys):
    fp = tmp_path / "fp.pt"
    assert main(["train", "--out", str(fp), *FAST]) == 0
    out = tmp_path / "q.pt"
    out.write_bytes(b"earlier result")
    assert main(["quantize", str(fp), "--k", "1", "--out", str(out)]) == 2
    assert "k must be an integer from 2" in capsys.readouterr().err
    assert main(["quantize", str(fp), "--out", str(out), "--overwrite"]) == 2
    assert "give --k" in capsys.readouterr().err
    assert main(["quantize", str(fp), "--out", str(out), "--k", "4"]) == 2
    assert "q.pt' exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier result"


def test_demo_writes_the_documented_json(data_env, tmp_path, capsys):
    out = tmp_path / "demo.json"
    code = main(["demo", "--epochs", "1", "--qareg-epochs", "1", "--ks", "2", "4",
                 "--val-size", "200", "--out", str(out), "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["full_precision"]) == {"accuracy", "file_bytes"}
    rows = result["rows"]
    assert [(r["method"], r["k"]) for r in rows] == [
        ("ptq-kmeans", 2), ("ptq-kmeans", 4), ("qareg", 2), ("qareg", 4)]
    for row in rows:
        assert row["bits_per_weight"] == {2: 1.0, 4: 2.0}[row["k"]]
        assert row["drop"] == pytest.approx(result["full_precision"]["accuracy"]
                                            - row["accuracy"])
        assert row["compression_ratio"] == pytest.approx(
            result["full_precision"]["file_bytes"] / row["file_bytes"])
        assert row["compression_ratio"] > 8  # k <= 4 on lenet5: about 18x to 28x
        assert row["file_bytes"] > 0
    printed = capsys.readouterr().out
    assert "ptq-kmeans" in printed and "file KB" in printed
    assert f"wall time {result['seconds']:.0f} s" in printed and result["seconds"] > 0


def test_demo_rejects_bad_k_before_training(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--ks", "1", "--out", str(out)]) == 2
    assert "k must be an integer from 2" in capsys.readouterr().err
    assert not out.exists()


def test_console_entry_point_exits_2_on_bad_input(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qareg", "train", "--lr", "-1", "--out",
                             str(tmp_path / "x.pt")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "lr must be a number > 0, got -1" in result.stderr


def test_train_with_a_rival_method_saves_a_quantized_checkpoint(data_env, tmp_path, capsys):
    out = tmp_path / "lsq2.pt"
    args = ["train", "--method", "lsq", "--bits", "2", "--option", "lr_scale=0.2",
            "--model", "lenet5", "--epochs", "1", "--val-size", "200", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "options: lr_scale=0.2 (the others at their defaults)" in printed
    assert "after quantization. Next: qareg compress" in printed
    from qareg.checkpoint import load_checkpoint

    model, meta = load_checkpoint(out)
    assert meta["method"] == "lsq" and meta["bits"] == 2 and meta["converted"]
    assert meta["config"]["method"]["lr_scale"] == 0.2
    for name, param in model.named_parameters():
        if name.endswith("weight") and param.dim() > 1:
            assert param.unique().numel() <= 4, name
    compressed = tmp_path / "lsq2.qz"
    assert main(["compress", str(out), str(compressed)]) == 0
    other = tmp_path / "lsq2-flag.pt"  # the option as a flag: the same run
    assert main([*args[:5], "--lr-scale", "0.2", *args[7:-1], str(other)]) == 0
    again, _ = load_checkpoint(other)
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_qareg_takes_bits_as_k(data_env, tmp_path):
    from qareg.checkpoint import load_checkpoint

    out = tmp_path / "q.pt"
    assert main(["train", "--method", "qareg", "--bits", "3", "--epochs", "1", "--val-size",
                 "200", "--batch-size", "64", "--no-progress", "--out", str(out)]) == 0
    model, meta = load_checkpoint(out)
    assert meta["bits"] == 3 and meta["converted"]
    assert {t.codebook.k for t in qareg.quantized_tensors(model)} == {8}


@pytest.mark.parametrize("extra, message", [
    (["--method", "lsq"], "method 'lsq' needs bits (1 to 8)"),
    (["--method", "lsq", "--bits", "9"], "bits must be an integer from 1 to 8"),
    (["--method", "cpq", "--bits", "2", "--option", "drop_rate"], "KEY=VALUE"),
    (["--method", "cpq", "--bits", "2", "--option", "nope=1"],
     "--nope does not apply to --method cpq; its options: lr_scale"),
    (["--method", "lsq", "--bits", "2", "--tau", "0.3"],
     "--tau does not apply to --method lsq (--tau is an option of dkm)"),
    (["--method", "fp", "--bits", "2"], "method 'fp' does not quantize; drop bits=2"),
    (["--method", "dkm", "--bits", "2", "--tau", "-1"], "tau must be a number > 0"),
])
def test_method_flags_are_checked_before_training(data_env, tmp_path, capsys, extra, message):
    out = tmp_path / "x.pt"
    assert main(["train", *extra, "--epochs", "1", "--val-size", "200", "--no-progress",
                 "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
