import math

import pytest
import torch

from qareg.config import DataConfig, TrainConfig, as_dict, from_dict, load_yaml
from qareg.errors import ConfigError
from qareg.methods.qareg import QaregConfig
from qareg.validate import check_device


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (TrainConfig, {"model": "resnet9"}, "model must be one of alexnet, cnn4, lenet5"),
        (TrainConfig, {"epochs": -1}, "epochs must be an integer >= 0, got -1"),
        (TrainConfig, {"lr": 0}, "lr must be a number > 0, got 0"),
        (TrainConfig, {"lr": math.nan}, "lr must be a number > 0, got nan"),
        (TrainConfig, {"optimizer": "rmsprop"}, "optimizer must be one of sgd, adam"),
        (TrainConfig, {"momentum": 1.5}, "momentum must be a number >= 0 and <= 1"),
        (TrainConfig, {"batch_size": True}, "batch_size must be an integer >= 1, got True"),
        (QaregConfig, {"k": 1}, "k must be an integer from 2 to 65536, got 1"),
        (QaregConfig, {"lam": -0.5}, "lam must be a number >= 0, got -0.5"),
        (QaregConfig, {"variant": "l3"}, "variant must be one of hard, soft, abs"),
        (QaregConfig, {"init": "zeros"}, "init must be one of linear, quantile"),
        (QaregConfig, {"ramp": 0}, "ramp must be a number > 0 and <= 1, got 0"),
        (QaregConfig, {"temperature": 0.0}, "temperature must be a number > 0"),
        (QaregConfig, {"include": "conv*"}, "include must be a list of glob patterns"),
        (QaregConfig, {"layer_weights": {"a": -1}}, "layer_weights\\['a'\\] must be"),
        (DataConfig, {"dataset": "mnist"}, "dataset must be one of cifar10, fashion-mnist"),
        (DataConfig, {"val_size": -3}, "val_size must be an integer >= 0, got -3"),
        (DataConfig, {"data_dir": ""}, "data_dir must be a folder name, or null"),
        (DataConfig, {"augment": "no"}, "augment must be true or false, got 'no'"),
        (TrainConfig, {"device": "gpu"}, "device must be a device, one of cpu, cuda, cuda:N, mps"),
        (QaregConfig, {"include": ["a", ""]}, "include has an empty pattern"),
        (QaregConfig, {"exclude": None}, "exclude must be a list of glob patterns, got None"),
        (QaregConfig, {"layer_weights": {"": 1.0}}, "layer_weights keys must be non-empty"),
        (QaregConfig, {"temperature_final": 0.01}, "temperature_final only applies with "
                                                         "variant soft"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(cls, values, message):
    with pytest.raises(ConfigError, match=message):
        cls(**values)


def test_devices_must_exist_on_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("device", "cuda:1")
    with pytest.raises(ConfigError, match="has 2 CUDA device\\(s\\), cuda:0 to cuda:1"):
        check_device("device", "cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available on this machine"):
        TrainConfig(device="cuda")
    assert TrainConfig(device="cpu").device == "cpu"


def test_yaml_reads_exponents_as_numbers_and_rejects_duplicate_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-4\n  epochs: 3\n")
    assert load_yaml(path) == {"train": {"lr": 0.001, "weight_decay": 0.0005, "epochs": 3}}
    path.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="found duplicate key 'lr'"):
        load_yaml(path)


def test_data_dir_may_be_a_path_and_is_kept_as_text(tmp_path):
    assert DataConfig(data_dir=tmp_path).data_dir == str(tmp_path)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown key lamda in section 'regularizer'; valid "
                                          "keys: k, init, variant"):
        from_dict(QaregConfig, {"lamda": 1.0}, where="section 'regularizer'")


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [8.0, 8.0, 8.0, 8.0]),
        ("linear", [0.0, 4.0, 8.0, 8.0]),
        ("cosine", [0.0, 4.0, 8.0, 8.0]),
        ("exponential", [0.008, 8.0 * 0.001**0.5, 8.0, 8.0]),
    ],
)
def test_lambda_schedules_ramp_over_the_given_fraction(schedule, expected):
    config = QaregConfig(lam=8.0, lam_schedule=schedule, ramp=0.5)
    got = [config.lambda_at(p) for p in (0.0, 0.25, 0.5, 1.0)]
    assert got == pytest.approx(expected)


def test_temperature_anneals_geometrically():
    config = QaregConfig(variant="soft", temperature=0.1, temperature_final=0.001)
    assert config.temperature_at(0.0) == pytest.approx(0.1)
    assert config.temperature_at(0.5) == pytest.approx(0.01)
    assert config.temperature_at(1.0) == pytest.approx(0.001)
    assert QaregConfig(temperature=0.2).temperature_at(0.7) == 0.2


def test_as_dict_is_json_friendly():
    values = as_dict(QaregConfig(include=["a.*"]))
    assert values["include"] == ["a.*"] and values["k"] == 4
