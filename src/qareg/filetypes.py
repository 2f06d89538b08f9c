"""What kind of file a path holds, from its first bytes: so that a command given the wrong
file says what the file is and what was expected, instead of a parser's raw error."""

from __future__ import annotations

import codecs
import json
import struct
from pathlib import Path

ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
COMPRESSED_MAGIC = b"\x89QAREGZ\n"  # qareg.compress.container.MAGIC (format 2 and later)
SNIFF_BYTES = 4096

KINDS = {
    "missing": "does not exist",
    "folder": "is a folder",
    "empty": "is empty (0 bytes)",
    "checkpoint": "is a PyTorch archive (a qareg checkpoint, .pt)",
    "compressed": "is a qareg compressed file (.qz, written by qareg compress)",
    "safetensors": "is a safetensors file without a qareg header",
    "text": "is a text file",
    "binary": "holds bytes of an unknown format",
}


def sniff(path: str | Path) -> str:
    """One of KINDS for the file at `path`."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if path.is_dir():
        return "folder"
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGIC):
        return "checkpoint"
    if head.startswith(COMPRESSED_MAGIC):
        return "compressed"
    if len(head) >= 9 and head[8:9] == b"{":
        (length,) = struct.unpack("<Q", head[:8])
        with path.open("rb") as f:
            f.seek(8)
            text = f.read(min(length, 100_000_000))
        try:
            layout = json.loads(text)
        except ValueError:
            return "binary"
        metadata = layout.get("__metadata__") if isinstance(layout, dict) else None
        return "compressed" if isinstance(metadata, dict) and "qareg" in metadata else (
            "safetensors")
    try:  # incremental: a character cut at the end of `head` is not an error
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return "binary"
    return "text"


def describe(path: str | Path) -> str:
    """'<path> is a text file', '<path> does not exist', ..."""
    return f"{str(path)!r} {KINDS[sniff(path)]}"
