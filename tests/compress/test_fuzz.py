"""Mutated files: every load ends in CompressedFileError or in the original network."""

import struct
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qareg
from qareg.compress import CompressedFileError, load_compressed, save_compressed

FUZZ_EXAMPLES = 2000


def _original() -> tuple[bytes, torch.nn.Module]:
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    # k = 3 on the first layer: its stream is range coded, the others bit-packed
    qareg.prepare(model, 4, k_per_tensor={"features.0.weight": 3}, init="linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qareg.convert(model)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.qz"
        save_compressed(model, path)
        return path.read_bytes(), model.eval()


ORIGINAL, MODEL = _original()
INPUT = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    EXPECTED = MODEL(INPUT)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(ORIGINAL)
    kind = draw(st.sampled_from(["flip", "truncate", "length", "overwrite", "insert"]))
    # half of the positions land in the header, where parsing is most delicate
    position = st.one_of(st.integers(0, min(len(data), 4096) - 1), st.integers(0, len(data) - 1))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(position)
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif kind == "length":
        data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    elif kind == "overwrite":
        i = draw(position)
        chunk = draw(st.binary(min_size=1, max_size=64))
        data[i:i + len(chunk)] = chunk
    else:
        i = draw(position)
        data[i:i] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated())
def test_mutated_files_fail_cleanly_or_load_exactly(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.qz"
        path.write_bytes(data)
        try:
            model = load_compressed(path)
        except CompressedFileError as error:
            assert str(path) in str(error)
            return
    with torch.no_grad():
        assert torch.equal(model.eval()(INPUT), EXPECTED)
