"""Deploying a compressed file: ONNX with codebook weights, and packed inference in PyTorch."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qareg
from conftest import learnable_images
from qareg.act_quant import attach_input_quantizers, input_quantizers
from qareg.cli import main
from qareg.compress import CompressedFileError, load_compressed, save_compressed
from qareg.compress.packed import packed_weights
from qareg.errors import ConfigError

ort = pytest.importorskip("onnxruntime")
from qareg.onnx_export import export_onnx, onnx_model  # noqa: E402

KS = (2, 4, 16)


def images(input_size: int) -> torch.Tensor:
    """Eight images of the tests' Fashion-MNIST fixture, normalised, zero-padded to size."""
    pixels, _ = learnable_images(8, seed=3)
    x = torch.from_numpy(pixels)[:, None].float().div(255).sub(0.29).div(0.35)
    pad = input_size - x.shape[-1]
    return nn.functional.pad(x, (0, pad, 0, pad))


@pytest.fixture(scope="module", params=qareg.list_models())
def compressed(request, tmp_path_factory):
    """(model name, input size, {k: (path of the .qz, the converted network)})."""
    name = request.param
    size = 32  # every registered model's usual input (the fixture's images zero-padded)
    folder, files = tmp_path_factory.mktemp(name), {}
    for k in KS:
        torch.manual_seed(k)
        model = qareg.create_model(name, num_classes=10, in_channels=1, input_size=size)
        qareg.prepare(model, k, init="linear", seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a model without batch norm says so
            qareg.convert(model, [images(size)])  # batch norm as after real calibration
        save_compressed(model, folder / f"k{k}.qz")
        files[k] = (folder / f"k{k}.qz", model.eval())
    return name, size, files


def test_every_model_runs_in_onnx_runtime_like_pytorch(compressed, tmp_path):
    name, size, files = compressed
    x = images(size)
    for k, (path, _) in files.items():
        out = tmp_path / f"{name}-{k}.onnx"
        sizes = export_onnx(path, out)
        assert sizes.onnx_bytes == out.stat().st_size < sizes.float32_onnx_bytes
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = load_compressed(path).eval()(x).numpy()
        # 1e-5 at the scale of the logits: float32 convolutions summed in another order
        # (vgg16's 13 layers: up to 1.5e-5 on logits of 2.2; the other models below 1e-6)
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(logits - expected).max() <= 1e-5 * scale, (name, k, scale)


def test_quantized_weights_are_codebooks_and_packed_indices_in_the_onnx_graph(compressed):
    name, _, files = compressed
    path, model = files[2]
    proto = onnx_model(path)
    initializers = {t.name: t for t in proto.graph.initializer}
    for t in qareg.quantize.quantized_tensors(model):
        assert t.name not in initializers  # rebuilt by Gather, not stored dense
        codebook = initializers[f"{t.name}.codebook"]
        assert list(codebook.dims) == [2]
        packed = initializers[f"{t.name}.indices"]
        assert packed.data_type == 2  # uint8, 8 indices of 1 bit to a byte
        assert list(packed.dims) == [-(-t.weight.numel() // 8)]
    gathers = [n for n in proto.graph.node if n.op_type == "Gather"]
    assert len(gathers) == len(qareg.quantize.quantized_tensors(model))


def test_packed_loading_is_bit_identical_and_holds_the_file_s_bytes(compressed):
    name, size, files = compressed
    x = images(size)
    for k, (path, _) in files.items():
        dense, packed = load_compressed(path).eval(), load_compressed(path, packed=True).eval()
        with torch.no_grad():
            assert torch.equal(packed(x), dense(x)), (name, k)
        info = qareg.inspect_compressed(path)
        held = sum(t.nbytes for t in packed.state_dict().values()) - info.raw_bytes
        assert held == sum(p.held_bytes() for p in packed_weights(packed))
        assert held <= 1.3 * (info.index_bytes + info.codebook_bytes), (name, k)
        assert not any("weight" in module.__dict__ for module in packed.modules())


def test_unsupported_layers_and_bad_files_write_nothing(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    qareg.prepare(model, 4)
    qareg.convert(model)
    save_compressed(model, tmp_path / "gelu.qz")
    out = tmp_path / "out.onnx"
    fresh = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with pytest.raises(ConfigError, match="layer '1' is a GELU, which is not supported"):
        export_onnx(tmp_path / "gelu.qz", out, model=fresh, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="records no input shape"):
        export_onnx(tmp_path / "gelu.qz", out, model=fresh)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CompressedFileError, match="is a text file"):
        export_onnx(tmp_path / "notes.txt", out)
    assert not out.exists()


def test_the_export_command_prints_the_three_sizes(tmp_path, capsys):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", num_classes=10, in_channels=1, input_size=28)
    qareg.prepare(model, 4, init="linear", seed=0)
    qareg.convert(model)
    path, out = tmp_path / "m.qz", tmp_path / "m.onnx"
    save_compressed(model, path)
    assert main(["export", str(path), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{path.stat().st_size} bytes (qareg compressed file)" in printed
    assert f"{out.stat().st_size} bytes (ONNX" in printed and "float32 ONNX" in printed
    assert main(["export", str(path), "--onnx", str(out)]) == 2  # exists: --overwrite


class SmallResidual(nn.Module):
    """Layers and functions the registered models do not use: average pooling, batch norm
    on features, relu and flatten as functions, a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.norm = nn.BatchNorm1d(4 * 16 * 16)
        self.head = nn.Linear(4 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu(self.conv(x))
        y = self.pool(y + self.conv(x))
        return self.head(self.norm(torch.flatten(y, 1)))


def test_functions_and_other_layers_export_too(tmp_path):
    torch.manual_seed(0)
    model = SmallResidual()
    qareg.prepare(model, 4, init="linear")
    x = images(32)
    qareg.convert(model, [x])
    save_compressed(model, tmp_path / "m.qz")
    torch.manual_seed(1)
    export_onnx(tmp_path / "m.qz", tmp_path / "m.onnx", model=SmallResidual(),
                input_shape=(1, 32, 32))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    assert np.abs(logits - expected).max() <= 1e-5 * max(1.0, float(np.abs(expected).max()))


def test_input_quantizers_are_in_the_graph_and_other_hooks_are_refused(tmp_path):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 32)
    x = images(32)
    attach_input_quantizers(model, 4, [x])
    qareg.prepare(model, 4)
    qareg.convert(model)
    save_compressed(model, tmp_path / "wa.qz")
    export_onnx(tmp_path / "wa.qz", tmp_path / "wa.onnx")
    graph = onnx_model(tmp_path / "wa.qz").graph
    assert sum(n.op_type == "Round" for n in graph.node) == len(input_quantizers(model)) == 5
    session = ort.InferenceSession(str(tmp_path / "wa.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = load_compressed(tmp_path / "wa.qz").eval()(x).numpy()
    assert np.abs(logits - expected).max() <= 1e-5 * max(1.0, float(np.abs(expected).max()))

    hooked = qareg.create_model("lenet5", 10, 1, 32)
    hooked.features[0].register_forward_hook(lambda module, args, output: output * 2)
    with pytest.raises(ConfigError, match="layer 'features.0' has forward hooks"):
        export_onnx(tmp_path / "wa.qz", tmp_path / "hooked.onnx", model=hooked,
                    input_shape=(1, 32, 32))
    assert not (tmp_path / "hooked.onnx").exists()
