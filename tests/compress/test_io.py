import json
import struct
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

import qareg
from qareg.compress import (
    CompressedFileError,
    inspect_compressed,
    load_compressed,
    save_compressed,
)
from qareg.compress.io import _digest
from qareg.errors import ConfigError


def converted(name: str, k: int, seed: int = 0, **prepare_args) -> nn.Module:
    torch.manual_seed(seed)
    model = qareg.create_model(name, num_classes=10, in_channels=3, input_size=32)
    qareg.prepare(model, k, init="linear", seed=seed, **prepare_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # batch norm not re-estimated: irrelevant here
        qareg.convert(model)
    return model.eval()


@pytest.mark.parametrize("name", qareg.list_models())
def test_loaded_logits_equal_the_converted_model(name, tmp_path):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for k in (2, 3, 4, 16, 256):
        model = converted(name, k)
        info = save_compressed(model, tmp_path / f"{k}.qz")
        loaded = load_compressed(tmp_path / f"{k}.qz").eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x)), (name, k)
        assert info.file_bytes < info.float32_bytes
        assert not any("_codebook" in key for key in loaded.state_dict())


def test_both_codings_are_used_and_recorded(tmp_path):
    model = converted("lenet5", 4, k_per_tensor={"features.0.weight": 3})
    info = save_compressed(model, tmp_path / "m.qz")
    codings = {t.name: t.coding for t in info.tensors}
    assert codings["features.0.weight"] == "range"  # 3 symbols in 2 bits: coding wins
    assert "packed" in codings.values()
    assert inspect_compressed(tmp_path / "m.qz") == info
    plain = save_compressed(model, tmp_path / "p.qz", entropy_coding=False)
    assert {t.coding for t in plain.tensors} == {"packed"}
    assert info.file_bytes < plain.file_bytes


def test_sizes_are_real_bytes(tmp_path):
    model = converted("cnn4", 16)
    info = save_compressed(model, tmp_path / "m.qz", entropy_coding=False)
    assert info.file_bytes == (tmp_path / "m.qz").stat().st_size
    state = {k: v for k, v in model.state_dict().items() if "_codebook" not in k}
    assert info.float32_bytes == len(safetensors.torch.save(state))
    for t in info.tensors:
        assert t.index_bytes == (t.numel * 4 + 7) // 8 and t.codebook_bytes == 16 * 4
    assert info.ideal_bytes <= info.file_bytes <= info.ideal_bytes + 20_000


def test_float16_codebooks_are_smaller_and_close(tmp_path):
    model = converted("lenet5", 16)
    full = save_compressed(model, tmp_path / "a.qz")
    half = save_compressed(model, tmp_path / "b.qz", codebook_dtype="float16")
    assert all(h.codebook_bytes * 2 == f.codebook_bytes
               for h, f in zip(half.tensors, full.tensors, strict=True))
    loaded = load_compressed(tmp_path / "b.qz")
    w, v = loaded.features[0].weight, model.features[0].weight
    assert not torch.equal(w, v) and torch.allclose(w, v, rtol=1e-3, atol=1e-6)


def test_a_module_outside_the_registry_loads_into_one_the_caller_gives(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    qareg.prepare(model, 5)
    qareg.convert(model)
    save_compressed(model, tmp_path / "m.qz")
    with pytest.raises(CompressedFileError, match="pass model="):
        load_compressed(tmp_path / "m.qz")
    fresh = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    loaded = load_compressed(tmp_path / "m.qz", model=fresh)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    wrong = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 4))
    with pytest.raises(CompressedFileError, match="has shape"):
        load_compressed(tmp_path / "m.qz", model=wrong)


def test_unsnapped_or_unprepared_models_are_refused(tmp_path):
    model = qareg.create_model("lenet5", 10, 1, 28)
    with pytest.raises(ConfigError, match="no codebooks"):
        save_compressed(model, tmp_path / "m.qz")
    qareg.prepare(model, 4)
    with pytest.raises(ConfigError, match="not snapped"):
        save_compressed(model, tmp_path / "m.qz")
    with pytest.raises(ConfigError, match="codebook_dtype"):
        save_compressed(model, tmp_path / "m.qz", codebook_dtype="int8")
    assert not (tmp_path / "m.qz").exists()


def test_meta_and_provenance_are_recorded(tmp_path):
    info = save_compressed(converted("lenet5", 4), tmp_path / "m.qz", meta={"seed": 3})
    assert info.meta["seed"] == 3 and "git_commit" in info.meta
    assert info.model["name"] == "lenet5"


def rewrite_header(path, change):
    """Re-sign a file after `change(header)`: a well-formed file with altered content."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    layout = json.loads(data[8:8 + n])
    header = json.loads(layout["__metadata__"]["qareg"])
    change(header)
    text = json.dumps(header)
    layout["__metadata__"] = {"qareg": text, "qareg_blake2b": _digest(text.encode())}
    head = json.dumps(layout).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n:])


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.qz"
    save_compressed(converted("lenet5", 4), path)
    return path


def test_unknown_format_version(saved):
    rewrite_header(saved, lambda h: h.update(format_version=99))
    with pytest.raises(CompressedFileError, match="format version 99"):
        load_compressed(saved)


def test_header_declaring_sizes_beyond_the_file(saved):
    data = bytearray(saved.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    saved.write_bytes(bytes(data))
    with pytest.raises(CompressedFileError, match="declares"):
        inspect_compressed(saved)


def test_index_stream_longer_than_declared(saved):
    rewrite_header(saved, lambda h: h["quantized"][0].update(shape=[1, 1, 1, 1]))
    with pytest.raises(CompressedFileError, match="has shape"):
        load_compressed(saved)


def test_other_files_are_not_qareg_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, plain)
    text = tmp_path / "notes.txt"
    text.write_text("these are notes, not a model")
    for path, message in ((plain, "no qareg header"), (text, "is a text file; expected a qareg"),
                          (tmp_path / "missing.qz", "does not exist")):
        with pytest.raises(CompressedFileError, match=message):
            load_compressed(path)


@pytest.mark.parametrize("cut", [0, 7, 8, 100, -1, -1000])
def test_truncated_files(saved, cut):
    data = saved.read_bytes()
    saved.write_bytes(data[:cut])
    with pytest.raises(CompressedFileError):
        load_compressed(saved)
