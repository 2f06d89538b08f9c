"""Compressed model files: codebooks plus bit-packed (or range-coded) indices.

Format 2 (`qareg.compress.container`): a 30-byte binary frame with a BLAKE2b digest of the
rest, a deflated JSON header (the qareg version, the model's registry name and constructor
arguments, how the model was made, and per quantized tensor its shape, dtype, k, codebook
dtype, coding and stream length; per other state entry, such as biases and batch norm, its
dtype and shape), then the sections back to back: each quantized tensor's codebook and
index stream, then the other entries as they are. Format 1 files (safetensors) still load.
Reading checks everything before it trusts anything: the digest, the header, that the
sections fill the file exactly, then shapes against the model. Any failure raises
`CompressedFileError`. No pickle: loading a file never runs code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from qareg.act_quant import attach_like, input_quantizers
from qareg.channel_groups import lookup
from qareg.checkpoint import atomic_write
from qareg.compress.bitpack import pack_bits, unpack_bits
from qareg.compress.container import (
    FORMAT_VERSION,
    PLAIN_VERSION,
    CompressedFileError,
    fail,
    pack,
    unpack,
)
from qareg.compress.entropy import empirical_entropy_bytes, range_decode, range_encode
from qareg.compress.info import CompressedInfo, FileContents
from qareg.compress.legacy import read_format1
from qareg.compress.packed import PackedWeight, attach_packed
from qareg.constants import CODEBOOK_SUFFIX
from qareg.errors import ConfigError
from qareg.filetypes import describe, sniff
from qareg.models import create_model
from qareg.provenance import provenance
from qareg.quantize import quantized_tensors
from qareg.version import __version__

__all__ = ["CompressedFileError", "inspect_compressed", "is_compressed_file",
           "load_compressed", "save_compressed"]

CODEBOOK_DTYPES = {"float32": torch.float32, "float16": torch.float16}
CODINGS = ("packed", "range")
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "float64": torch.float64}
RAW_DTYPES = {**WEIGHT_DTYPES, "int64": torch.int64, "int32": torch.int32,
              "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in RAW_DTYPES.items()}
EXPECTED = "expected a qareg compressed file: a .qz file written by qareg compress"


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes, little-endian and row-major."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _codebook_keys(model: nn.Module) -> set[str]:
    """State-dict keys that belong to codebooks (not stored: the file has the values)."""
    return {key for key in model.state_dict() if CODEBOOK_SUFFIX + "." in key}


def _float32_safetensors_bytes(model: nn.Module, skip: set[str]) -> int:
    """The size of the same network as a float32 safetensors file: the reference size."""
    state = {key: (value.float() if value.is_floating_point() else value).detach().cpu()
             for key, value in model.state_dict().items() if key not in skip}
    return len(safetensors.torch.save(state))


def _dtype_name(key: str, tensor: torch.Tensor) -> str:
    if tensor.dtype not in DTYPE_NAMES:
        raise ConfigError(f"state entry {key!r} has dtype {tensor.dtype}, which a compressed "
                          f"file cannot hold; allowed: {', '.join(RAW_DTYPES)}")
    return DTYPE_NAMES[tensor.dtype]


def save_compressed(
    model: nn.Module,
    path: str | Path,
    *,
    codebook_dtype: str = "float32",
    entropy_coding: bool = True,
    meta: dict[str, Any] | None = None,
    raw_dtype: str = "float32",
) -> CompressedInfo:
    """Write converted `model` (every quantized tensor snapped by `qareg.convert`) to `path`.

    Each index stream is bit-packed at ceil(log2 k) bits, or range coded where
    `entropy_coding` is on and that is smaller. float16 codebooks halve the codebook bytes,
    and a float16 `raw_dtype` the floating-point tensors stored as they are (biases, batch
    norm; a fifth of a small network's file), but the loaded network then differs from
    `model` by float16 rounding. `meta` (JSON values) is stored with the file's provenance.
    """
    for name, value in (("codebook_dtype", codebook_dtype), ("raw_dtype", raw_dtype)):
        if value not in CODEBOOK_DTYPES:
            raise ConfigError(f"{name} must be one of {', '.join(CODEBOOK_DTYPES)}, got "
                              f"{value!r}")
    quantized = quantized_tensors(model)
    if not quantized:
        raise ConfigError("the model has no codebooks: prepare and convert it first")
    codebook_keys = _codebook_keys(model)
    skip = set(codebook_keys)
    contents = FileContents(model=dict(getattr(model, "qareg_model_spec", None) or {}) or None,
                            qareg_version=__version__, meta={**(meta or {}), **provenance()},
                            float32_bytes=_float32_safetensors_bytes(model, codebook_keys),
                            entries=[])
    for t in quantized:
        weight = t.weight.detach().cpu()
        values = t.codebook.representatives().detach().cpu().to(weight.dtype)
        scales = t.codebook.channel_scale
        scales = None if scales is None else scales.cpu().to(weight.dtype)
        indices = t.codebook.assign(weight).cpu()
        if not torch.equal(lookup(values, indices, scales), weight):
            raise ConfigError(f"tensor {t.name!r} is not snapped to its codebook: call "
                              "qareg.convert(model) before save_compressed")
        flat = indices.reshape(-1).numpy()
        stream, coding = pack_bits(flat, t.codebook.bits), "packed"
        if entropy_coding:
            coded = range_encode(flat, t.codebook.k)
            if coded.size < stream.size:
                stream, coding = coded, "range"
        contents.entries.append({
            "name": t.name, "shape": list(weight.shape), "dtype": _dtype_name(t.name, weight),
            "k": t.codebook.k, "bits": t.codebook.bits, "coding": coding,
            "entropy_bytes": round(empirical_entropy_bytes(flat, t.codebook.k), 1),
            "groups": t.codebook.groups})
        contents.codebooks[t.name] = values.to(CODEBOOK_DTYPES[codebook_dtype])
        if t.codebook.channel_scale is not None:
            contents.channel_scales[t.name] = t.codebook.channel_scale.detach().cpu().to(
                CODEBOOK_DTYPES[codebook_dtype])
        contents.streams[t.name] = torch.from_numpy(stream)
        skip.add(t.name)
    contents.raw = {key: _stored_raw(value.detach().cpu(), raw_dtype)
                    for key, value in model.state_dict().items() if key not in skip}
    data = _format2_bytes(contents)
    atomic_write(path, lambda f: f.write(data))
    return contents.info(len(data))


def _stored_raw(value: torch.Tensor, raw_dtype: str) -> torch.Tensor:
    """`value` as stored: float32 tensors in `raw_dtype`, anything else as it is."""
    if value.dtype == torch.float32:
        return value.to(CODEBOOK_DTYPES[raw_dtype])
    return value


def _grouping(contents: FileContents, entry: dict[str, Any]) -> list[int] | None:
    """[groups, 1 if channel scales] of a grouped tensor (format 3's ninth field), or None."""
    scaled = entry["name"] in contents.channel_scales
    return [entry["groups"], int(scaled)] if entry["groups"] > 1 or scaled else None


def _format2_bytes(contents: FileContents) -> bytes:
    """Format 2, or 3 where some codebook is grouped: each quantized row then ends in
    [groups, channel scales] and its codebook section is followed by its channel scales."""
    rows, sections = [], []
    for e in contents.entries:
        # name, shape, dtype, k, codebook dtype, coding, stream bytes, entropy bytes
        row = [e["name"], e["shape"], e["dtype"], e["k"],
               DTYPE_NAMES[contents.codebooks[e["name"]].dtype], e["coding"],
               contents.streams[e["name"]].numel(), e["entropy_bytes"]]
        grouping = _grouping(contents, e)
        rows.append(row if grouping is None else [*row, grouping])
        sections.append(_tensor_bytes(contents.codebooks[e["name"]]))
        if e["name"] in contents.channel_scales:
            sections.append(_tensor_bytes(contents.channel_scales[e["name"]]))
        sections.append(_tensor_bytes(contents.streams[e["name"]]))
    header = {
        "qareg": contents.qareg_version, "model": contents.model, "meta": contents.meta,
        "float32_bytes": contents.float32_bytes, "quantized": rows,
        "raw": [[key, _dtype_name(key, value), list(value.shape)]
                for key, value in contents.raw.items()],
    }
    sections += [_tensor_bytes(value) for value in contents.raw.values()]
    grouped = any(len(row) > 8 for row in rows)
    return pack(header, sections, FORMAT_VERSION if grouped else PLAIN_VERSION)


# ---------------------------------------------------------------------------- reading


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(n, int) and n >= 0 for n in value)


def _take(path: Path, rest: memoryview, offset: int, count: int, dtype: torch.dtype,
          what: str) -> tuple[torch.Tensor, int]:
    """`count` values of `dtype` at `offset` of `rest`, copied; and the offset after them."""
    size = count * torch.empty(0, dtype=dtype).element_size()
    if offset + size > len(rest):
        raise fail(path, f"{what} lies beyond the end of the file")
    values = torch.frombuffer(bytearray(rest[offset:offset + size]), dtype=torch.uint8)
    return values.view(dtype), offset + size


def _read_format2(path: Path, data: bytes) -> FileContents:
    header, rest = unpack(path, data)
    contents = FileContents(model=header["model"], qareg_version=header["qareg"],
                            meta=header["meta"], float32_bytes=header["float32_bytes"],
                            entries=[])
    offset = 0
    for row in header["quantized"]:
        name, shape, dtype, k, codebook_dtype, coding, stream_bytes, entropy = row[:8]
        groups, scaled = row[8] if len(row) == 9 else (1, 0)
        if not (len(row) in (8, 9) and isinstance(k, int) and 2 <= k <= 1 << 16
                and codebook_dtype in CODEBOOK_DTYPES and isinstance(stream_bytes, int)
                and stream_bytes >= 0 and _is_shape(shape) and isinstance(groups, int)
                and 1 <= groups <= max(1, shape[0] if shape else 1) and scaled in (0, 1)
                and (not scaled or shape)):
            raise fail(path, f"bad entry for tensor {name!r}: {row!r}")
        contents.entries.append({"name": name, "shape": shape, "dtype": dtype, "k": k,
                                 "bits": max(1, (k - 1).bit_length()), "coding": coding,
                                 "entropy_bytes": entropy, "groups": groups})
        codebook, offset = _take(path, rest, offset, groups * k, CODEBOOK_DTYPES[codebook_dtype],
                                 f"the codebook of {name!r}")
        contents.codebooks[name] = codebook if groups == 1 else codebook.reshape(groups, k)
        if scaled:
            contents.channel_scales[name], offset = _take(
                path, rest, offset, shape[0], CODEBOOK_DTYPES[codebook_dtype],
                f"the channel scales of {name!r}")
        contents.streams[name], offset = _take(path, rest, offset, stream_bytes, torch.uint8,
                                               f"the index stream of {name!r}")
    for key, dtype, shape in header["raw"]:
        if dtype not in RAW_DTYPES or not _is_shape(shape):
            raise fail(path, f"bad entry for tensor {key!r}: dtype {dtype!r}, shape {shape!r}")
        values, offset = _take(path, rest, offset, math.prod(shape), RAW_DTYPES[dtype],
                               f"tensor {key!r}")
        contents.raw[key] = values.reshape(shape)
    if offset != len(rest):
        raise fail(path, f"{len(rest) - offset} bytes after the last section: not a file this "
                   "qareg wrote")
    return contents


def _check_entries(path: Path, contents: FileContents) -> None:
    for e in contents.entries:
        k = e["k"]
        if not (isinstance(k, int) and 2 <= k <= 1 << 16 and e["bits"] == max(1, (k - 1)
                .bit_length()) and e["coding"] in CODINGS and e["dtype"] in WEIGHT_DTYPES
                and _is_shape(e["shape"])):
            raise fail(path, f"bad entry for tensor {e['name']!r}: {e}")
        codebook, groups = contents.codebooks[e["name"]], e.get("groups", 1)
        expected = (k,) if groups == 1 else (groups, k)
        if codebook.shape != expected or codebook.dtype not in CODEBOOK_DTYPES.values():
            raise fail(path, f"codebook of {e['name']!r} has shape {tuple(codebook.shape)} and "
                       f"dtype {codebook.dtype}; expected {expected} float32 or float16")


def read_contents(path: str | Path) -> tuple[FileContents, int]:
    path = Path(path)
    kind = sniff(path)
    if kind == "checkpoint":
        raise CompressedFileError(f"{str(path)!r} is a qareg checkpoint (.pt), not a compressed "
                                  f"file: `qareg compress {path} OUT.qz` writes one from it "
                                  "(once quantized)")
    if kind in ("missing", "folder", "empty", "text"):
        raise CompressedFileError(f"{describe(path)}; {EXPECTED}")
    data = path.read_bytes()
    try:
        if kind == "safetensors" or (kind == "compressed" and data[8:9] == b"{"):
            contents = read_format1(path, data)
        else:
            contents = _read_format2(path, data)
        _check_entries(path, contents)
    except CompressedFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise fail(path, f"malformed qareg header ({type(error).__name__}: {error})") from None
    return contents, len(data)


def is_compressed_file(path: str | Path) -> bool:
    """Whether `path` looks like a qareg compressed file (a cheap sniff, not a check)."""
    return sniff(path) == "compressed"


def inspect_compressed(path: str | Path) -> CompressedInfo:
    """Size accounting of a compressed file (fully checked, nothing decoded)."""
    contents, size = read_contents(path)
    return contents.info(size)


def decode_indices(path: Path, entry: dict[str, Any], stream: torch.Tensor) -> torch.Tensor:
    count = math.prod(entry["shape"])
    try:
        if entry["coding"] == "packed":
            indices = unpack_bits(stream.numpy(), entry["bits"], count)
        else:
            indices = range_decode(stream.numpy(), entry["k"], count)
    except ValueError as error:
        raise fail(path, f"index stream of {entry['name']!r}: {error}") from None
    if count and int(indices.max()) >= entry["k"]:
        raise fail(path, f"index stream of {entry['name']!r} has indices >= k={entry['k']}")
    return torch.from_numpy(indices.astype(np.int64)).reshape(entry["shape"])


def load_compressed(path: str | Path, model: nn.Module | None = None,
                    device: str | torch.device = "cpu", packed: bool = False) -> nn.Module:
    """The network stored at `path`, on `device`, with every quantized weight decoded once to
    `codebook[indices]` (dense, so inference costs what it always did); with `packed`, kept
    as the file stores it and decoded layer by layer in each forward pass
    (`qareg.compress.packed`: memory near the file's size, outputs bit-identical).

    The model is rebuilt from the registry by the name and arguments the file records; give
    `model` to load into a module of your own (a model outside the registry) instead.
    """
    path = Path(path)
    contents, _ = read_contents(path)
    if model is None:
        if contents.model is None:
            raise fail(path, "the file records no registry model: pass model=<your module>")
        try:
            model = create_model(**contents.model)
        except (ConfigError, TypeError) as error:
            raise fail(path, f"cannot rebuild the model it records: {error}") from None
    if not input_quantizers(model):  # layer-input quantizers travel as raw tensors
        import qareg.methods  # noqa: F401  (registers the methods' own quantizer kinds)

        attach_like(model, contents.raw)
    expected = {key: value for key, value in model.state_dict().items()
                if key not in _codebook_keys(model)}
    stored = {e["name"]: tuple(e["shape"]) for e in contents.entries}
    stored.update({key: tuple(value.shape) for key, value in contents.raw.items()})
    if set(stored) != set(expected):
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise fail(path, f"does not fit the model: missing {missing[:10]}, unexpected "
                   f"{extra[:10]}")
    for key, shape in stored.items():  # before decoding: sizes come from the model
        if shape != tuple(expected[key].shape):
            raise fail(path, f"tensor {key!r} has shape {shape}; the model's is "
                       f"{tuple(expected[key].shape)}")
    state = dict(contents.raw)
    for entry in contents.entries:
        name, dtype = entry["name"], WEIGHT_DTYPES[entry["dtype"]]
        indices = decode_indices(path, entry, contents.streams[name])
        codebook, scales = contents.codebooks[name], contents.channel_scales.get(name)
        if packed:  # checked by decoding once above; kept as stored
            attach_packed(model, name, PackedWeight(contents.streams[name], codebook, entry,
                                                    dtype, scales))
        else:
            state[name] = lookup(codebook.to(dtype), indices,
                                 None if scales is None else scales.to(dtype))
    model.load_state_dict(state, strict=False)
    return model.to(device)
