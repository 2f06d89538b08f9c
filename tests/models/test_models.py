import pytest
import torch

from qareg.errors import ConfigError
from qareg.models import create_model, list_models

# Smallest image side each architecture accepts (see the comments in each model file).
MIN_INPUT_SIZE = {"alexnet": 15, "cnn4": 4, "lenet5": 12, "lenet5-caffe": 16, "vgg16": 1}


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def test_all_models_registered() -> None:
    assert list_models() == ["alexnet", "cnn4", "lenet5", "lenet5-caffe", "vgg16"]


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_forward_backward(name: str, shape: tuple[int, int, int]) -> None:
    model = create_model(name, num_classes=10, in_channels=shape[0], input_size=shape[1])
    x = torch.randn(2, *shape)
    y = model(x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", list_models())
def test_num_classes_sets_output_width(name: str) -> None:
    model = create_model(name, num_classes=100).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", list_models())
def test_spec_rebuilds_same_state_dict(name: str) -> None:
    model = create_model(name, num_classes=7, in_channels=1, input_size=28)
    spec = model.qareg_model_spec
    assert spec == {"name": name, "num_classes": 7, "in_channels": 1, "input_size": 28}
    rebuilt = create_model(**spec)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


@pytest.mark.parametrize("name", list_models())
def test_input_size_range(name: str) -> None:
    lo = MIN_INPUT_SIZE[name]
    for size in (lo, 28, 64):
        model = create_model(name, in_channels=1, input_size=size)
        assert model(torch.zeros(2, 1, size, size)).shape == (2, 10)
    for size in (lo - 1, 257):
        with pytest.raises(ConfigError, match=rf"input_size={size}\b.*{lo}\.\.256"):
            create_model(name, in_channels=1, input_size=size)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("resnet50")
    assert "resnet50" in str(info.value)
    for name in list_models():
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 1}, r"num_classes=1\b.*>= 2"),
        ({"num_classes": 0}, r"num_classes=0\b"),
        ({"in_channels": 0}, r"in_channels=0\b.*>= 1"),
        ({"input_size": 8}, r"input_size=8\b"),
        ({"input_size": 32.0}, r"input_size=32\.0"),
        ({"num_classes": True}, r"num_classes=True"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_model("lenet5", **kwargs)


def test_vgg16_parameter_count() -> None:
    n = sum(p.numel() for p in create_model("vgg16").parameters())
    assert 14_000_000 < n < 16_000_000


@pytest.mark.parametrize("name", ["vgg16", "cnn4"])
def test_batch_norm_stats_untouched_by_construction(name: str) -> None:
    bn = [m for m in create_model(name).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn
    for m in bn:
        assert m.training
        assert m.num_batches_tracked.item() == 0
        assert torch.equal(m.running_var, torch.ones_like(m.running_var))
