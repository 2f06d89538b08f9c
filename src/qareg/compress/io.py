"""Compressed model files: codebooks plus bit-packed (or range-coded) indices, in safetensors.

Layout. A safetensors file (no pickle: reading one never runs code) holding, for every
quantized tensor NAME, `codebook/NAME` (its k values, float32 or float16) and
`indices/NAME` (uint8: the index stream), and for every other state entry (biases, batch
norm) `raw/NAME` as it is. The safetensors metadata holds two strings: `qareg`, a JSON
header (format version, the model's registry name and constructor arguments, qareg version,
each quantized tensor's shape, k, bits and coding, how the model was made, and the
BLAKE2b-128 digest of every tensor's bytes), and `qareg_blake2b`, the digest of that
header. Reading checks everything before it trusts anything: sizes against the file, the
header's checksum, each section's checksum, then shapes against the model. Any failure
raises `CompressedFileError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from qareg.checkpoint import atomic_write
from qareg.compress.bitpack import pack_bits, unpack_bits
from qareg.compress.entropy import empirical_entropy_bytes, range_decode, range_encode
from qareg.compress.info import CompressedInfo, StoredTensor
from qareg.constants import CODEBOOK_SUFFIX
from qareg.errors import ConfigError, QaregError
from qareg.filetypes import describe, sniff
from qareg.models import create_model
from qareg.provenance import provenance
from qareg.quantize import quantized_tensors
from qareg.version import __version__

FORMAT = "qareg-compressed"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
CODEBOOK_DTYPES = {"float32": torch.float32, "float16": torch.float16}
CODINGS = ("packed", "range")
WEIGHT_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


class CompressedFileError(QaregError):
    """A file that is not a readable qareg compressed file: truncated, corrupted, of
    another format or version, or not matching the model it is loaded into. The message
    says what is wrong; nothing is loaded."""


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes safetensors writes for `tensor` (little-endian, row-major)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(data: bytes | memoryview) -> str:
    """BLAKE2b-128 of `data`: any corruption is caught, at 32 hex characters per section."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _codebook_keys(model: nn.Module) -> set[str]:
    """State-dict keys that belong to codebooks (not stored: the file has the values)."""
    return {key for key in model.state_dict() if CODEBOOK_SUFFIX + "." in key}


def _float32_safetensors_bytes(model: nn.Module, skip: set[str]) -> int:
    state = {key: (value.float() if value.is_floating_point() else value).detach().cpu()
             for key, value in model.state_dict().items() if key not in skip}
    return len(safetensors.torch.save(state))


def save_compressed(
    model: nn.Module,
    path: str | Path,
    *,
    codebook_dtype: str = "float32",
    entropy_coding: bool = True,
    meta: dict[str, Any] | None = None,
) -> CompressedInfo:
    """Write converted `model` (every quantized tensor snapped by `qareg.convert`) to `path`.

    Each index stream is bit-packed at ceil(log2 k) bits, or range coded where
    `entropy_coding` is on and that is smaller. float16 codebooks halve the codebook bytes
    but the loaded weights then differ from `model`'s by float16 rounding.
    """
    if codebook_dtype not in CODEBOOK_DTYPES:
        raise ConfigError(f"codebook_dtype must be one of {', '.join(CODEBOOK_DTYPES)}, "
                          f"got {codebook_dtype!r}")
    quantized = quantized_tensors(model)
    if not quantized:
        raise ConfigError("the model has no codebooks: prepare and convert it first")
    codebook_keys = _codebook_keys(model)
    skip = set(codebook_keys)
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for t in quantized:
        weight = t.weight.detach().cpu()
        values = t.codebook.representatives().detach().cpu().to(weight.dtype)
        indices = t.codebook.assign(weight).cpu()
        if not torch.equal(values[indices], weight):
            raise ConfigError(f"tensor {t.name!r} is not snapped to its codebook: call "
                              "qareg.convert(model) before save_compressed")
        flat = indices.reshape(-1).numpy()
        stream, coding = pack_bits(flat, t.codebook.bits), "packed"
        if entropy_coding:
            coded = range_encode(flat, t.codebook.k)
            if coded.size < stream.size:
                stream, coding = coded, "range"
        tensors[f"codebook/{t.name}"] = values.to(CODEBOOK_DTYPES[codebook_dtype])
        tensors[f"indices/{t.name}"] = torch.from_numpy(stream)
        entries.append({"name": t.name, "shape": list(weight.shape), "dtype": str(weight.dtype),
                        "k": t.codebook.k, "bits": t.codebook.bits, "coding": coding,
                        "entropy_bytes": empirical_entropy_bytes(flat, t.codebook.k)})
        skip.add(t.name)
    raw = {key: value.detach().cpu() for key, value in model.state_dict().items()
           if key not in skip}
    tensors.update({f"raw/{key}": value for key, value in raw.items()})
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qareg_version": __version__,
        "model": dict(getattr(model, "qareg_model_spec", None) or {}) or None,
        "quantized": entries,
        "raw": list(raw),
        "meta": {**(meta or {}), **provenance()},
        "float32_bytes": _float32_safetensors_bytes(model, codebook_keys),
        "checksums": {key: _digest(_tensor_bytes(value)) for key, value in tensors.items()},
    }
    text = json.dumps(header, sort_keys=True)
    data = safetensors.torch.save(tensors, metadata={"qareg": text, "qareg_blake2b": _digest(
        text.encode())})
    atomic_write(path, lambda f: f.write(data))
    return _info(header, tensors, len(data))


def _info(header: dict[str, Any], tensors: dict[str, torch.Tensor], file_bytes: int
          ) -> CompressedInfo:
    stored = tuple(
        StoredTensor(
            name=e["name"], shape=tuple(e["shape"]), k=e["k"], bits=e["bits"],
            coding=e["coding"], index_bytes=tensors[f"indices/{e['name']}"].numel(),
            codebook_bytes=tensors[f"codebook/{e['name']}"].nbytes,
            entropy_bytes=e["entropy_bytes"],
        )
        for e in header["quantized"]
    )
    raw = [tensors[f"raw/{key}"] for key in header["raw"]]
    return CompressedInfo(
        file_bytes=file_bytes, float32_bytes=header["float32_bytes"],
        raw_bytes=sum(t.nbytes for t in raw), raw_values=sum(t.numel() for t in raw),
        tensors=stored, model=header["model"], qareg_version=header["qareg_version"],
        meta=header["meta"],
    )


# ---------------------------------------------------------------------------- reading


def _fail(path: Path, message: str) -> CompressedFileError:
    return CompressedFileError(f"{str(path)!r}: {message}")


def _read_header(path: Path, data: bytes) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(safetensors header without metadata, qareg header, offset of the data), checked."""
    if len(data) < 8:
        raise _fail(path, f"{len(data)} bytes: too short for a safetensors file; {EXPECTED}")
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER_BYTES or 8 + length > len(data):
        raise _fail(path, f"the header declares {length} bytes but the file has "
                    f"{len(data) - 8} after the length field: truncated, or not a qareg "
                    f"compressed file; {EXPECTED}")
    try:
        layout = json.loads(data[8:8 + length])
        assert isinstance(layout, dict)
    except (ValueError, AssertionError):
        raise _fail(path, "the header is not valid JSON: not a qareg file, or corrupted") from None
    metadata = layout.pop("__metadata__", None)
    if not isinstance(metadata, dict) or "qareg" not in metadata:
        raise _fail(path, "no qareg header: not a qareg compressed file")
    text = metadata["qareg"]
    if not isinstance(text, str) or metadata.get("qareg_blake2b") != _digest(text.encode()):
        raise _fail(path, "the qareg header fails its checksum: the file is corrupted")
    header = json.loads(text)
    if header.get("format") != FORMAT:
        raise _fail(path, f"format {header.get('format')!r} is not {FORMAT!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise _fail(path, f"format version {header.get('format_version')!r}; this qareg "
                    f"reads version {FORMAT_VERSION}")
    return layout, header, 8 + length


def _read_tensors(path: Path, data: bytes, layout: dict[str, Any], header: dict[str, Any],
                  base: int) -> dict[str, torch.Tensor]:
    checksums = header["checksums"]
    if set(layout) != set(checksums):
        raise _fail(path, "the tensors in the file differ from those its header lists")
    view = memoryview(data)
    for key, entry in layout.items():
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= len(data) - base:
            raise _fail(path, f"section {key!r} lies beyond the end of the file")
        if _digest(view[base + start:base + end]) != checksums[key]:
            raise _fail(path, f"section {key!r} fails its checksum: the file is corrupted")
    try:
        return safetensors.torch.load(data)
    except Exception as error:  # SafetensorError and friends
        raise _fail(path, f"not a valid safetensors container: {error}") from None


EXPECTED = "expected a qareg compressed file: a .qz file written by qareg compress"


def _read(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], int]:
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
        layout, header, base = _read_header(path, data)
        tensors = _read_tensors(path, data, layout, header, base)
        _check_entries(path, header, tensors)
    except CompressedFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise _fail(path, f"malformed qareg header ({type(error).__name__}: {error})") from None
    return header, tensors, len(data)


def _check_entries(path: Path, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    for e in header["quantized"]:
        k, bits, coding = e["k"], e["bits"], e["coding"]
        if not (isinstance(k, int) and 2 <= k <= 1 << 16 and bits == max(1, (k - 1).bit_length())
                and coding in CODINGS and e["dtype"] in WEIGHT_DTYPES
                and all(isinstance(n, int) and n >= 0 for n in e["shape"])):
            raise _fail(path, f"bad entry for tensor {e['name']!r}: {e}")
        codebook = tensors[f"codebook/{e['name']}"]
        if codebook.shape != (k,) or codebook.dtype not in CODEBOOK_DTYPES.values():
            raise _fail(path, f"codebook of {e['name']!r} has shape {tuple(codebook.shape)} and "
                        f"dtype {codebook.dtype}; expected ({k},) float32 or float16")
        if tensors[f"indices/{e['name']}"].dtype != torch.uint8:
            raise _fail(path, f"index stream of {e['name']!r} is not uint8")
    missing = [key for key in header["raw"] if f"raw/{key}" not in tensors]
    if missing:
        raise _fail(path, f"the header lists raw tensors the file lacks: {missing[:10]}")


def is_compressed_file(path: str | Path) -> bool:
    """Whether `path` looks like a qareg compressed file (a cheap sniff, not a check)."""
    return sniff(path) == "compressed"


def inspect_compressed(path: str | Path) -> CompressedInfo:
    """Size accounting of a compressed file (fully checked, nothing decoded)."""
    header, tensors, size = _read(path)
    return _info(header, tensors, size)


def _decode_indices(path: Path, entry: dict[str, Any], stream: torch.Tensor) -> torch.Tensor:
    count = math.prod(entry["shape"])
    try:
        if entry["coding"] == "packed":
            indices = unpack_bits(stream.numpy(), entry["bits"], count)
        else:
            indices = range_decode(stream.numpy(), entry["k"], count)
    except ValueError as error:
        raise _fail(path, f"index stream of {entry['name']!r}: {error}") from None
    if count and int(indices.max()) >= entry["k"]:
        raise _fail(path, f"index stream of {entry['name']!r} has indices >= k={entry['k']}")
    return torch.from_numpy(indices.astype(np.int64)).reshape(entry["shape"])


def load_compressed(path: str | Path, model: nn.Module | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """The network stored at `path`, on `device`, with every quantized weight decoded once to
    `codebook[indices]` (dense, so inference costs what it always did).

    The model is rebuilt from the registry by the name and arguments the file records; give
    `model` to load into a module of your own (a model outside the registry) instead.
    """
    path = Path(path)
    header, tensors, _ = _read(path)
    if model is None:
        if header["model"] is None:
            raise _fail(path, "the file records no registry model: pass model=<your module>")
        try:
            model = create_model(**header["model"])
        except (ConfigError, TypeError) as error:
            raise _fail(path, f"cannot rebuild the model it records: {error}") from None
    expected = {key: value for key, value in model.state_dict().items()
                if key not in _codebook_keys(model)}
    stored = {e["name"]: tuple(e["shape"]) for e in header["quantized"]}
    stored.update({key: tuple(tensors[f"raw/{key}"].shape) for key in header["raw"]})
    if set(stored) != set(expected):
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise _fail(path, f"does not fit the model: missing {missing[:10]}, unexpected "
                    f"{extra[:10]}")
    for key, shape in stored.items():  # before decoding: sizes come from the model
        if shape != tuple(expected[key].shape):
            raise _fail(path, f"tensor {key!r} has shape {shape}; the model's is "
                        f"{tuple(expected[key].shape)}")
    state = {key: tensors[f"raw/{key}"] for key in header["raw"]}
    for entry in header["quantized"]:
        indices = _decode_indices(path, entry, tensors[f"indices/{entry['name']}"])
        codebook = tensors[f"codebook/{entry['name']}"]
        state[entry["name"]] = codebook.to(WEIGHT_DTYPES[entry["dtype"]])[indices]
    model.load_state_dict(state, strict=False)
    return model.to(device)
