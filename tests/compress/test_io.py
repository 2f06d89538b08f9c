import struct
import warnings
from pathlib import Path

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
from qareg.compress.container import FRAME, pack, unpack
from qareg.errors import ConfigError

FORMAT1_FIXTURE = Path(__file__).parent / "data" / "lenet5-v1.qz"


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
    header, sections = unpack(path, path.read_bytes())
    change(header)
    path.write_bytes(pack(header, [bytes(sections)]))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.qz"
    save_compressed(converted("lenet5", 4), path)
    return path


def test_unknown_format_version(saved):
    data = bytearray(saved.read_bytes())
    data[8:10] = struct.pack("<H", 99)
    saved.write_bytes(bytes(data))
    with pytest.raises(CompressedFileError, match="format version 99"):
        load_compressed(saved)


def test_header_declaring_sizes_beyond_the_file(saved):
    data = saved.read_bytes()
    body = struct.pack("<I", 10**9) + data[FRAME.size:]
    saved.write_bytes(data[:10] + qareg.compress.container.digest(body) + body)
    with pytest.raises(CompressedFileError, match="declares"):
        inspect_compressed(saved)


def test_sections_must_fill_the_file_exactly(saved):
    data = saved.read_bytes()
    header, sections = unpack(saved, data)
    for extra, message in ((b"\0", "1 bytes after the last section"),
                           (None, "beyond the end of the file")):
        body = bytes(sections) + extra if extra else bytes(sections)[:-1]
        saved.write_bytes(pack(header, [body]))
        with pytest.raises(CompressedFileError, match=message):
            load_compressed(saved)


def test_any_flipped_bit_fails_the_checksum(saved):
    data = saved.read_bytes()
    for position in (FRAME.size - 1, FRAME.size + 10, len(data) // 2, len(data) - 1):
        flipped = bytearray(data)
        flipped[position] ^= 4
        saved.write_bytes(bytes(flipped))
        with pytest.raises(CompressedFileError, match="checksum"):
            load_compressed(saved)


def test_the_header_is_under_five_percent_of_a_one_bit_lenet5_file(tmp_path):
    """Format 1 spent 31% of this file on headers (3,848 of 12,516 bytes, trained)."""
    model = converted("lenet5", 2)
    info = save_compressed(model, tmp_path / "m.qz", meta={"method": "qareg", "bits": 1,
                                                           "seed": 0})
    assert info.header_bytes == info.file_bytes - (
        info.index_bytes + info.codebook_bytes + info.raw_bytes)
    assert 0 < info.header_bytes <= 0.05 * info.file_bytes, info.header_bytes


def test_format1_files_still_load_exactly():
    """The fixture was written by format 1's writer from this network, seed 0."""
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", num_classes=10, in_channels=1, input_size=28)
    qareg.prepare(model, 4, init="linear", seed=0, k_per_tensor={"features.0.weight": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qareg.convert(model)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    loaded = load_compressed(FORMAT1_FIXTURE).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    info = inspect_compressed(FORMAT1_FIXTURE)
    assert info.meta["note"] == "format 1 fixture"
    assert {t.coding for t in info.tensors} == {"range", "packed"}


def test_index_stream_longer_than_declared(saved):
    rewrite_header(saved, lambda h: h["quantized"][0].__setitem__(1, [1, 1, 1, 1]))
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


def test_float16_raw_tensors_halve_them_and_load_close(tmp_path):
    model = converted("cnn4", 4)  # batch norm: many raw tensors, and an int64 counter
    full = save_compressed(model, tmp_path / "a.qz")
    half = save_compressed(model, tmp_path / "b.qz", raw_dtype="float16")
    integer_bytes = sum(v.nbytes for k, v in model.state_dict().items()
                        if not v.is_floating_point())
    assert half.raw_bytes - integer_bytes == (full.raw_bytes - integer_bytes) // 2
    assert half.index_bytes == full.index_bytes and half.file_bytes < full.file_bytes
    loaded = load_compressed(tmp_path / "b.qz").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), rtol=1e-2, atol=1e-2)
    with pytest.raises(ConfigError, match="raw_dtype must be one of float32, float16"):
        save_compressed(model, tmp_path / "c.qz", raw_dtype="bfloat16")
