"""Bad input to every subcommand, from flags and from YAML: exit code 2, a message naming the
bad value and what is allowed, and nothing written (no new file, an existing one unchanged)."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from qareg.checkpoint import save_checkpoint
from qareg.cli import main
from qareg.compress import save_compressed
from qareg.config import DataConfig, TrainConfig, as_dict
from qareg.models import create_model
from qareg.quantize import convert, prepare

DEVICES = "one of cpu, cuda, cuda:N, mps"
MODELS = "model must be one of alexnet, cnn4, lenet5"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Untrained lenet5 checkpoints at each stage, a compressed file and a file of garbage."""
    folder = tmp_path_factory.mktemp("inputs")
    meta = {"method": "fp", "converted": False, "init_from": None,
            "config": {"data": as_dict(DataConfig(val_size=200))}}
    torch.manual_seed(0)
    model = create_model("lenet5", 10, 1, 28)
    save_checkpoint(folder / "fp.pt", model, meta)
    running = {**meta, "config": {**meta["config"], "train": as_dict(TrainConfig())}}
    save_checkpoint(folder / "unfinished.pt", model, running, train_state={"epoch": 1})
    prepare(model, 4, init="linear")
    save_checkpoint(folder / "prepared.pt", model, {**meta, "method": "qareg"})
    convert(model)
    save_checkpoint(folder / "quantized.pt", model, {**meta, "converted": True})
    save_compressed(model, folder / "model.qz", meta={"method": "qareg"})
    (folder / "garbage.bin").write_bytes(b"not a model\n" * 10)
    (folder / "random.bin").write_bytes(bytes(range(256)) * 4)
    (folder / "empty.pt").write_bytes(b"")
    return {p.stem: p for p in folder.iterdir()}


def case(id: str, argv: str, *messages: str, yaml: str | bytes | None = None,
         machine: str | None = None):
    """One bad input: `argv` with {out}, {existing}, {config}, {tmp} and the names of `inputs`
    as placeholders; every one of `messages` must appear in stderr. `machine` fakes the
    accelerators: no-cuda, one-cuda or no-mps."""
    return pytest.param(argv, messages, yaml, machine, id=id)


TRAIN = "train --out {out} --metrics {tmp}/new/m.jsonl"
QAREG = TRAIN + " --method qareg --val-size 200"
YAML = TRAIN + " --config {config}"

CASES = [
    # ------------------------------------------------------------------ train: flags
    case("train-precision", TRAIN + " --precision fp16",
         "precision must be one of fp32, bf16; got 'fp16'"),
    case("train-resume-changed-recipe-unfinished-out-kept", TRAIN + " --out {unfinished}",
         "holds an unfinished run (epoch 1 of 10); pass --resume"),
    case("train-metrics-is-out", "train --out {out} --metrics {out}",
         "--metrics", "is also --out"),
    case("train-device-unknown", TRAIN + " --device gpu0",
         f"device must be a device, {DEVICES}; got 'gpu0'"),
    case("train-device-cuda-absent", TRAIN + " --device cuda",
         "device 'cuda': CUDA is not available on this machine; use --device cpu",
         machine="no-cuda"),
    case("train-device-cuda-index", TRAIN + " --device cuda:3",
         "device 'cuda:3': this machine has 1 CUDA device(s), cuda:0 to cuda:0",
         machine="one-cuda"),
    case("train-device-mps-absent", TRAIN + " --device mps",
         "device 'mps': MPS is not available on this machine", machine="no-mps"),
    case("train-epochs-negative", TRAIN + " --epochs -1", "epochs must be an integer >= 0, got -1"),
    case("train-lr-nan", TRAIN + " --lr nan", "lr must be a number > 0, got nan"),
    case("train-batch-size-zero", TRAIN + " --batch-size 0",
         "batch_size must be an integer >= 1, got 0"),
    case("train-optimizer", TRAIN + " --optimizer rmsprop",
         "optimizer must be one of sgd, adam; got 'rmsprop'"),
    case("train-model", TRAIN + " --model resnet9", MODELS, "got 'resnet9'"),
    case("train-bad-value-keeps-existing-out", "train --out {existing} --overwrite --momentum 2",
         "momentum must be a number >= 0 and <= 1, got 2.0"),
    case("train-dataset", TRAIN + " --dataset mnist",
         "dataset must be one of cifar10, fashion-mnist; got 'mnist'"),
    case("train-data-dir-empty", TRAIN + " --data-dir ''",
         "data_dir must be a folder name, or null for the default; got ''"),
    case("train-data-dir-missing", TRAIN + " --data-dir {tmp}/nowhere --val-size 200",
         "nowhere does not exist or is not a folder", "train-images-idx3-ubyte.gz"),
    case("train-val-size-too-large", TRAIN + " --val-size 5000",
         "val_size=5000 must be in [0, 1200)"),
    case("train-include-empty", QAREG + " --include ''", "include has an empty pattern in ['']"),
    case("train-exclude-matches-nothing", QAREG + " --exclude 'nope.*'",
         "exclude pattern 'nope.*' matches no parameter; parameters: features.0.weight"),
    case("train-k-larger-than-smallest-tensor", QAREG + " --k 200",
         "k=200 is larger than tensor 'features.0.weight' with 150 entries"),
    case("train-layer-weights-match-nothing", QAREG + " --layer-weights 'nope*=2'",
         "layer_weights pattern 'nope*' matches no parameter; parameters: features.0.weight"),
    case("train-layer-weights-syntax", QAREG + " --layer-weights conv",
         "--layer-weights takes PATTERN=WEIGHT pairs, got 'conv'"),
    case("train-temperature-final-without-soft", QAREG + " --temperature-final 0.01",
         "temperature_final only applies with variant soft; variant is 'hard'"),
    case("train-method-option-of-another-method", TRAIN + " --k 4",
         "--k does not apply to --method fp (--k is an option of qareg, qareg-reg, qareg-ste); "
         "its options: none"),
    case("train-finished-out-kept", "train --out {existing}",
         "existing.pt' holds a finished run (fp); pass --overwrite to replace it"),
    case("train-resume-a-finished-run", "train --out {existing} --resume",
         "holds a finished run (fp), nothing to resume; pass --overwrite"),
    case("train-resume-and-overwrite", "train --out {out} --resume --overwrite",
         "give one of them"),
    case("train-out-a-foreign-file", "train --out {garbage}",
         "exists (is a text file); pass --overwrite to replace it"),
    case("train-bits-and-k-disagree", QAREG + " --bits 2 --k 8",
         "bits=2 means k = 4, but k is 8; give one of them"),
    case("train-init-from-text", TRAIN + " --init-from {garbage}",
         "garbage.bin' is a text file; expected a qareg checkpoint"),
    case("train-out-is-folder", "train --out {tmp}", "is a folder; give a file name"),
    case("train-out-under-a-file", "train --out {existing}/model.pt", "is not a folder"),
    case("train-metrics-is-folder", "train --out {out} --metrics {tmp}",
         "--metrics", "is a folder; give a file name"),
    case("train-init-from-missing", TRAIN + " --init-from {tmp}/missing.pt",
         "--init-from", "missing.pt' does not exist or is not a file"),
    case("argparse-train-int-literal", TRAIN + " --epochs two",
         "argument --epochs: invalid int value: 'two'"),
    case("argparse-train-unknown-flag", TRAIN + " --learning-rate 0.1",
         "unrecognized arguments: --learning-rate"),
    case("argparse-train-method", TRAIN + " --method sgd",
         "argument --method: invalid choice: 'sgd'"),
    case("argparse-train-no-out", "train --epochs 1",
         "the following arguments are required: --out"),
    # ------------------------------------------------------------------- train: YAML
    case("yaml-unknown-section", YAML, "unknown section(s) optimizer",
         "valid sections: data, train, method", yaml="optimizer:\n  lr: 0.1\n"),
    case("yaml-unknown-key", YAML,
         "unknown key learning_rate in section 'train' of config file", "config.yaml'; valid "
         "keys: model, epochs, batch_size",
         yaml="train:\n  learning_rate: 0.1\n"),
    case("yaml-unknown-keys-of-two-types", YAML + " --method qareg",
         "unknown keys 1, lamda in section 'method' of config file", "; valid keys: k, init, "
         "variant",
         yaml="regularizer:\n  1: 2\n  lamda: 3\n"),
    case("yaml-section-a-number", YAML, "section 'train' in",
         "must be a mapping of keys to values, got 3", yaml="train: 3\n"),
    case("yaml-section-a-list", YAML, "section 'data' in",
         "must be a mapping of keys to values, got ['a', 'b']", yaml="data: [a, b]\n"),
    case("yaml-top-level-list", YAML, "must hold a mapping of sections", yaml="- train\n"),
    case("yaml-string-for-int", YAML, "epochs must be an integer >= 0, got '3'",
         yaml="train:\n  epochs: '3'\n"),
    case("yaml-bad-value-under-a-flag", YAML + " --epochs 1",
         "section 'train' of config file", "config.yaml': epochs must be an integer >= 0, "
         "got 'three'", yaml="train:\n  epochs: three\n"),
    case("yaml-bad-value-names-the-file", YAML, "section 'data' of config file",
         "config.yaml': val_size must be an integer >= 0, got -1", yaml="data:\n  val_size: -1\n"),
    case("yaml-float-for-int", YAML, "val_size must be an integer >= 0, got 100.5",
         yaml="data:\n  val_size: 100.5\n"),
    case("yaml-bool-for-number", YAML, "lr must be a number > 0, got True",
         yaml="train:\n  lr: true\n"),
    case("yaml-list-for-model", YAML, MODELS, "got ['lenet5']",
         yaml="train:\n  model: [lenet5]\n"),
    case("yaml-list-for-device", YAML, f"device must be a device, {DEVICES}; got ['cpu']",
         yaml="train:\n  device: [cpu]\n"),
    case("yaml-string-for-bool", YAML, "augment must be true or false, got 'no'",
         yaml="data:\n  augment: 'no'\n"),
    case("yaml-int-for-bool", YAML, "download must be true or false, got 1",
         yaml="data:\n  download: 1\n"),
    case("yaml-list-for-data-dir", YAML, "data_dir must be a folder name, or null",
         yaml="data:\n  data_dir: [a]\n"),
    case("yaml-null-include", YAML + " --method qareg",
         "include must be a list of glob patterns, got None",
         yaml="regularizer:\n  include: null\n"),
    case("yaml-string-include", YAML + " --method qareg",
         "include must be a list of glob patterns, got 'conv*'",
         yaml="regularizer:\n  include: 'conv*'\n"),
    case("yaml-number-layer-weights-key", YAML + " --method qareg",
         "layer_weights keys must be non-empty glob patterns, got 1",
         yaml="regularizer:\n  layer_weights: {1: 2}\n"),
    case("yaml-regularizer-without-qareg", YAML,
         "unknown key k in section 'method' of config file", "valid keys: none (it takes no",
         yaml="regularizer:\n  k: 4\n"),
    case("yaml-duplicate-section", YAML, "found duplicate key 'train'",
         yaml="train:\n  epochs: 1\ntrain:\n  epochs: 2\n"),
    case("yaml-syntax", YAML, "is not valid YAML", yaml="train: [1\n"),
    case("yaml-not-utf8", YAML, "is not UTF-8 text", yaml=b"train:\n  model: \xff\n"),
    case("yaml-missing-file", TRAIN + " --config {tmp}/missing.yaml",
         "cannot read config file", "missing.yaml"),
    case("yaml-exponent-is-a-number-flag-still-checked", YAML + " --seed -2",  # lr passes
         "seed must be an integer >= 0, got -2", yaml="train:\n  lr: 1e-3\n"),
    # ----------------------------------------------------------------------- quantize
    case("quantize-k-too-small", "quantize {fp} --out {existing} --k 1",
         "--k must be an integer from 2 to 65536, got 1"),
    case("quantize-init", "quantize {fp} --out {out} --k 4 --init zeros",
         "--init must be one of linear, quantile, kmeans++, kmeans", "got 'zeros'"),
    case("quantize-bn-batches", "quantize {fp} --out {out} --k 4 --bn-batches 0",
         "--bn-batches must be an integer >= 1, got 0"),
    case("quantize-seed", "quantize {fp} --out {out} --k 4 --seed -1",
         "--seed must be an integer >= 0, got -1"),
    case("quantize-device-unknown", "quantize {fp} --out {existing} --k 4 --device cuda0",
         f"--device must be a device, {DEVICES}; got 'cuda0'"),
    case("quantize-device-cuda-absent", "quantize {fp} --out {out} --k 4 --device cuda",
         "CUDA is not available on this machine; use --device cpu", machine="no-cuda"),
    case("quantize-out-is-input", "quantize {fp} --out {fp} --k 4",
         "--out", "fp.pt' is the input file; give another file name"),
    case("quantize-k-with-codebooks", "quantize {prepared} --out {out} --k 4",
         "already has codebooks", "omit --k"),
    case("quantize-init-with-codebooks", "quantize {prepared} --out {out} --init linear",
         "already has codebooks", "omit --init"),
    case("quantize-no-k", "quantize {fp} --out {existing} --overwrite",
         "has no codebooks: give --k"),
    case("quantize-existing-out", "quantize {fp} --out {existing} --k 4",
         "existing.pt' exists; pass --overwrite to replace it"),
    case("quantize-twice", "quantize {quantized} --out {out}", "is already quantized"),
    case("quantize-missing-checkpoint", "quantize {tmp}/none.pt --out {out} --k 4",
         "none.pt' does not exist"),
    case("quantize-not-a-checkpoint", "quantize {garbage} --out {out} --k 4",
         "garbage.bin' is a text file; expected a qareg checkpoint"),
    case("quantize-empty-file", "quantize {empty} --out {out} --k 4",
         "empty.pt' is empty (0 bytes); expected a qareg checkpoint"),
    case("quantize-dataset", "quantize {fp} --out {out} --k 4 --dataset mnist",
         "dataset must be one of cifar10, fashion-mnist; got 'mnist'"),
    case("argparse-quantize-k-literal", "quantize {fp} --out {out} --k four",
         "argument --k: invalid int value: 'four'"),
    # ----------------------------------------------------------------------- evaluate
    case("evaluate-device-unknown", "evaluate {fp} --device tpu",
         f"--device must be a device, {DEVICES}; got 'tpu'"),
    case("evaluate-device-cuda-absent", "evaluate {model} --device cuda:0",
         "CUDA is not available on this machine", machine="no-cuda"),
    case("evaluate-missing-checkpoint", "evaluate {tmp}/none.pt", "does not exist"),
    case("evaluate-dataset", "evaluate {fp} --dataset mnist",
         "dataset must be one of cifar10, fashion-mnist; got 'mnist'"),
    case("evaluate-data-dir-missing", "evaluate {fp} --data-dir {tmp}/nowhere",
         "nowhere does not exist or is not a folder"),
    case("argparse-evaluate-split", "evaluate {fp} --split train",
         "argument --split: invalid choice: 'train'"),
    # ----------------------------------------------------------------- compress, inspect
    case("compress-not-quantized", "compress {prepared} {existing} --overwrite",
         "is not quantized yet"),
    case("compress-existing-out", "compress {quantized} {existing}",
         "existing.pt' exists; pass --overwrite"),
    case("compress-out-is-input", "compress {quantized} {quantized}",
         "quantized.pt' is the input file"),
    case("compress-out-is-folder", "compress {quantized} {tmp}", "is a folder"),
    case("argparse-compress-dtype", "compress {quantized} {out} --codebook-dtype float8",
         "argument --codebook-dtype: invalid choice: 'float8'"),
    case("inspect-missing", "inspect {tmp}/none.qz", "none.qz' does not exist; expected a qareg "
         "compressed file"),
    case("inspect-a-checkpoint", "inspect {quantized}",
         "quantized.pt' is a qareg checkpoint (.pt), not a compressed file: `qareg compress"),
    case("evaluate-random-bytes", "evaluate {random}",
         "random.bin' holds bytes of an unknown format; expected a qareg checkpoint"),
    case("evaluate-empty", "evaluate {empty}", "empty.pt' is empty (0 bytes)"),
    case("inspect-not-compressed", "inspect {garbage}", "garbage.bin"),
    # --------------------------------------------------------------------------- demo
    case("demo-k-too-small", "demo --ks 1 --out {out}",
         "k must be an integer from 2 to 65536, got 1"),
    case("demo-k-repeated", "demo --ks 2 2 --out {existing} --overwrite",
         "ks must not repeat a k, got [2, 2]"),
    case("demo-k-larger-than-smallest-tensor",
         "demo --ks 2 4096 --val-size 200 --no-progress --out {out}",
         "ks: k=4096 is larger than tensor 'features.0.weight' of lenet5 with 150 entries"),
    case("demo-qareg-epochs", "demo --qareg-epochs 0 --out {out}",
         "qareg_epochs must be an integer >= 1, got 0"),
    case("demo-epochs", "demo --epochs -1 --out {out}", "epochs must be an integer >= 0, got -1"),
    case("demo-lam", "demo --lam -1 --out {out}", "lam must be a number >= 0, got -1.0"),
    case("demo-model", "demo --model resnet9 --out {out}", MODELS, "got 'resnet9'"),
    case("demo-device-cuda-absent", "demo --device cuda --out {existing} --overwrite",
         "CUDA is not available on this machine; use --device cpu", machine="no-cuda"),
    case("demo-data-dir-empty", "demo --data-dir '' --out {out}", "data_dir must be a folder name"),
    case("demo-out-is-folder", "demo --out {tmp}", "is a folder"),
    case("argparse-demo-no-ks", "demo --ks --out {out}", "argument --ks: expected at least one"),
    case("argparse-no-command", "", "the following arguments are required: command"),
]


def _snapshot(*folders: Path) -> dict[Path, bytes | None]:
    """Every file (with its bytes) and folder under `folders`."""
    return {p: p.read_bytes() if p.is_file() else None
            for folder in folders for p in sorted(folder.rglob("*"))}


def _fake_machine(monkeypatch: pytest.MonkeyPatch, machine: str | None) -> None:
    if machine == "no-cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    elif machine == "one-cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    elif machine == "no-mps":
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("argv, messages, yaml, machine", CASES)
def test_bad_input_exits_2_names_it_and_writes_nothing(
    argv, messages, yaml, machine, inputs, fashion_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QAREG_DATA", str(fashion_dir))
    _fake_machine(monkeypatch, machine)
    existing = tmp_path / "existing.pt"
    shutil.copyfile(inputs["fp"], existing)  # a finished checkpoint
    config = tmp_path / "config.yaml"
    if yaml is not None:
        config.write_bytes(yaml.encode() if isinstance(yaml, str) else yaml)
    out = tmp_path / "new" / "out.pt"  # in a folder not created yet
    names = {"out": out, "existing": existing, "config": config, "tmp": tmp_path, **inputs}
    args = [token.format(**names) for token in shlex.split(argv)]
    before = _snapshot(tmp_path, inputs["fp"].parent)

    try:
        code = main(args)
    except SystemExit as error:  # argparse's own errors
        code = error.code
    err = capsys.readouterr().err

    assert code == 2, err
    for message in messages:
        assert message in err, err
    assert re.search(r"^qareg( \w+)?: error: ", err, re.MULTILINE) and "Traceback" not in err
    assert _snapshot(tmp_path, inputs["fp"].parent) == before  # nothing written, nothing changed
    assert not out.parent.exists()
    assert existing.read_bytes() == inputs["fp"].read_bytes()


def test_there_are_enough_cases_and_every_subcommand_has_some():
    assert len(CASES) >= 25
    commands = {(shlex.split(c.values[0]) or ["none"])[0] for c in CASES}
    assert commands == {"train", "quantize", "evaluate", "compress", "inspect", "demo", "none"}
