"""Reading format 1 (qareg up to 0.x of November 2026): a safetensors file whose metadata
holds a JSON header with a BLAKE2b digest per tensor. Written no more; read so that files
saved by earlier versions still load."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from qareg.compress.container import fail
from qareg.compress.info import FileContents

FORMAT = "qareg-compressed"
FORMAT_VERSION = 1
MAX_LAYOUT_BYTES = 100_000_000  # safetensors' own limit on its JSON layout


def _hex_digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _layout(path: Path, data: bytes) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(safetensors layout without metadata, qareg header, offset of the data), checked."""
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_LAYOUT_BYTES or 8 + length > len(data):
        raise fail(path, f"the header declares {length} bytes but the file has "
                   f"{len(data) - 8} after the length field: truncated, or not a qareg "
                   "compressed file")
    try:
        layout = json.loads(data[8:8 + length])
        assert isinstance(layout, dict)
    except (ValueError, AssertionError):
        raise fail(path, "the header is not valid JSON: not a qareg file, or corrupted") from None
    metadata = layout.pop("__metadata__", None)
    if not isinstance(metadata, dict) or "qareg" not in metadata:
        raise fail(path, "no qareg header: not a qareg compressed file")
    text = metadata["qareg"]
    if not isinstance(text, str) or metadata.get("qareg_blake2b") != _hex_digest(text.encode()):
        raise fail(path, "the qareg header fails its checksum: the file is corrupted")
    header = json.loads(text)
    if header.get("format") != FORMAT:
        raise fail(path, f"format {header.get('format')!r} is not {FORMAT!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise fail(path, f"format version {header.get('format_version')!r}; this qareg "
                   f"reads versions 1 to 3")
    return layout, header, 8 + length


def read_format1(path: Path, data: bytes) -> FileContents:
    """The contents of format-1 file `data`, every section's digest checked."""
    layout, header, base = _layout(path, data)
    checksums = header["checksums"]
    if set(layout) != set(checksums):
        raise fail(path, "the tensors in the file differ from those its header lists")
    view = memoryview(data)
    for key, entry in layout.items():
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= len(data) - base:
            raise fail(path, f"section {key!r} lies beyond the end of the file")
        if _hex_digest(view[base + start:base + end]) != checksums[key]:
            raise fail(path, f"section {key!r} fails its checksum: the file is corrupted")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as error:  # SafetensorError and friends
        raise fail(path, f"not a valid safetensors container: {error}") from None
    entries = [{key: e[key] for key in ("name", "shape", "dtype", "k", "bits", "coding",
                                        "entropy_bytes")} for e in header["quantized"]]
    for e in entries:  # format 1 wrote dtypes as "torch.float32"
        e["dtype"] = str(e["dtype"]).removeprefix("torch.")
    missing = [key for key in header["raw"] if f"raw/{key}" not in tensors]
    if missing:
        raise fail(path, f"the header lists raw tensors the file lacks: {missing[:10]}")
    for e in entries:
        if f"codebook/{e['name']}" not in tensors or f"indices/{e['name']}" not in tensors:
            raise fail(path, f"tensor {e['name']!r} has no codebook or index stream")
        if tensors[f"indices/{e['name']}"].dtype != torch.uint8:
            raise fail(path, f"index stream of {e['name']!r} is not uint8")
    return FileContents(
        model=header["model"], qareg_version=header["qareg_version"], meta=header["meta"],
        float32_bytes=header["float32_bytes"], entries=entries,
        codebooks={e["name"]: tensors[f"codebook/{e['name']}"] for e in entries},
        streams={e["name"]: tensors[f"indices/{e['name']}"] for e in entries},
        raw={key: tensors[f"raw/{key}"] for key in header["raw"]},
    )
