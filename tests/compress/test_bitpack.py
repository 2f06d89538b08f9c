import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qareg.compress.bitpack import CHUNK, pack_bits, packed_size, unpack_bits


@settings(max_examples=300, deadline=None)
@given(bits=st.integers(1, 16), data=st.data())
def test_unpack_inverts_pack_for_every_bit_width(bits, data):
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=200))
    indices = np.array(values, dtype=np.int64)
    packed = pack_bits(indices, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_size(len(values), bits)
    np.testing.assert_array_equal(unpack_bits(packed, bits, len(values)), indices)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 11, 16])
def test_round_trip_across_chunk_boundaries(bits):
    rng = np.random.default_rng(bits)
    indices = rng.integers(0, 1 << bits, CHUNK + 13)
    np.testing.assert_array_equal(unpack_bits(pack_bits(indices, bits), bits, indices.size),
                                  indices)


def test_layout_is_little_endian_lsb_first():
    # 3-bit indices 1, 2, 7 -> bits 100 010 111 (LSB first) -> bytes 0b11010001, 0b00000001
    assert pack_bits(np.array([1, 2, 7]), 3).tolist() == [0b11010001, 0b00000001]
    assert pack_bits(np.array([1, 0, 3, 2]), 2).tolist() == [0b10110001]


def test_size_is_exactly_the_bits_needed():
    assert [packed_size(n, 3) for n in (0, 1, 8, 9)] == [0, 1, 3, 4]
    assert pack_bits(np.arange(0), 5).size == 0


def test_wrong_stream_length_is_rejected():
    with pytest.raises(ValueError, match="take 3 bytes"):
        unpack_bits(np.zeros(2, dtype=np.uint8), 3, 8)
