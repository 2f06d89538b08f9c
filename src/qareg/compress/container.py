"""The byte layout of a compressed file (formats 2 and 3): a short binary frame, a deflated
JSON header, then the tensors' bytes back to back. Format 3 is format 2 plus grouped
codebooks (`qareg.channel_groups`); a file without them is written as format 2, so that
older readers still take it.

    offset  bytes  content
    0       8      MAGIC
    8       2      format version, little-endian uint16
    10      16     BLAKE2b-128 digest of every byte from offset 26 to the end
    26      4      length H of the header, little-endian uint32
    30      H      the header: compact JSON, raw deflate with a preset dictionary
    30 + H  ...    the sections the header lists, in its order, with no padding

The frame costs 30 bytes and the header a few hundred: format 1 (safetensors, a JSON
layout and a digest per tensor) spent 31% of a 1-bit lenet5 file on them. One digest over
everything still catches any corruption; the header says each section's size, and the
sizes must add up to the file exactly.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import Any

from qareg.errors import QaregError

MAGIC = b"\x89QAREGZ\n"  # not text (0x89), names the format, ends in a newline like PNG's
FORMAT_VERSION = 3  # the newest this qareg writes: grouped codebooks
PLAIN_VERSION = 2  # written when no tensor has a grouped codebook
FRAME = struct.Struct("<8sH16sI")  # magic, version, digest, header length
DIGEST_BYTES = 16
MAX_HEADER_BYTES = 1 << 26  # a header inflates to at most 64 MiB
DEFLATE_WINDOW = -15  # raw deflate: the digest already guards the bytes, no zlib wrapper
# Deflate's preset dictionary: strings most headers repeat, so that even the first use of
# each costs a back-reference. Part of format 2: changing it needs a new format version.
HEADER_DICTIONARY = (
    b'"num_batches_tracked","int64",[]],["running_mean","running_var",".weight",".bias",'
    b'"float16","bfloat16","float32","range","packed",'
    b'{"float32_bytes":,"meta":{"bits":,"created":"2026-12-01T00:00:00+00:00",'
    b'"git_commit":"","k":,"method":"qareg","python_version":"3.11.","qareg_version":"0.1.0",'
    b'"seed":,"torch_version":"2.13.0+cpu"},"model":{"in_channels":,"input_size":,'
    b'"name":"lenet5","num_classes":10},"qareg":"0.1.0","quantized":[["features.0.weight",'
    b'[],"float32",'
)


class CompressedFileError(QaregError):
    """A file that is not a readable qareg compressed file: truncated, corrupted, of
    another format or version, or not matching the model it is loaded into. The message
    says what is wrong; nothing is loaded."""


def fail(path: str | Path, message: str) -> CompressedFileError:
    """The error for `path`, naming it."""
    return CompressedFileError(f"{str(path)!r}: {message}")


def digest(data: bytes | memoryview) -> bytes:
    """BLAKE2b-128 of `data`."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def pack(header: dict[str, Any], sections: list[bytes], version: int = PLAIN_VERSION
         ) -> bytes:
    """The file's bytes: frame (format `version`), deflated `header`, then `sections`."""
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    deflater = zlib.compressobj(9, zlib.DEFLATED, DEFLATE_WINDOW, zdict=HEADER_DICTIONARY)
    deflated = deflater.compress(text) + deflater.flush()
    body = struct.pack("<I", len(deflated)) + deflated + b"".join(sections)
    assert version in (PLAIN_VERSION, FORMAT_VERSION), f"cannot write format {version}"
    return MAGIC + struct.pack("<H", version) + digest(body) + body


def is_container(head: bytes) -> bool:
    """Whether `head` (the first bytes of a file) starts like a format-2 or -3 file."""
    return head.startswith(MAGIC)


def unpack(path: str | Path, data: bytes) -> tuple[dict[str, Any], memoryview]:
    """(header, the bytes after it) of the file `data` read from `path`, checked: magic,
    version, digest, header length and JSON. Raises CompressedFileError."""
    if len(data) < FRAME.size:
        raise fail(path, f"{len(data)} bytes: too short for a qareg compressed file "
                   f"(at least {FRAME.size})")
    magic, version, expected, length = FRAME.unpack_from(data)
    if magic != MAGIC:
        raise fail(path, "does not start like a qareg compressed file")
    if version not in (PLAIN_VERSION, FORMAT_VERSION):
        raise fail(path, f"format version {version}; this qareg reads versions 1 to "
                   f"{FORMAT_VERSION}")
    view = memoryview(data)
    if digest(view[FRAME.size - 4:]) != expected:
        raise fail(path, "fails its checksum: the file is truncated or corrupted")
    if FRAME.size + length > len(data):
        raise fail(path, f"the header declares {length} bytes but the file has "
                   f"{len(data) - FRAME.size} after the frame")
    try:
        inflater = zlib.decompressobj(DEFLATE_WINDOW, zdict=HEADER_DICTIONARY)
        text = inflater.decompress(view[FRAME.size:FRAME.size + length], MAX_HEADER_BYTES)
        header = json.loads(text)
        assert isinstance(header, dict) and inflater.eof and not inflater.unconsumed_tail
    except (zlib.error, ValueError, AssertionError):
        raise fail(path, "the header is not deflated JSON: the file is corrupted") from None
    return header, view[FRAME.size + length:]
