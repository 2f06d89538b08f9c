"""Compressed model files: bit-packing, entropy coding and the file container."""

from qareg.compress.bitpack import pack_bits, unpack_bits
from qareg.compress.info import CompressedInfo
from qareg.compress.io import (
    CompressedFileError,
    inspect_compressed,
    is_compressed_file,
    load_compressed,
    save_compressed,
)

__all__ = [
    "CompressedFileError",
    "CompressedInfo",
    "inspect_compressed",
    "is_compressed_file",
    "load_compressed",
    "pack_bits",
    "save_compressed",
    "unpack_bits",
]
