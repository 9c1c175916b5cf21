"""Wire format: header and CRC, bit packing, the uint8 carrier, and malformed payloads rejected with the reason."""

import math

import numpy as np
import pytest
import torch

from fedml_progfed.comm.codecs import MalformedPayloadError, decode, encode, payload_from_tensor
from fedml_progfed.comm.codecs.sparsify import TAG_NBYTES
from fedml_progfed.comm.codecs.wire_format import (
    FORMAT_VERSION,
    HEADER_NBYTES,
    ByteReader,
    Header,
    pack_bits,
    read_header,
    unpack_bits,
)
from fedml_progfed.errors import InvalidUpdateError

SPEC = "lq4+topk10"


def test_bit_packing_layout():
    codes = np.array([1, 2, 3, 0, 1], dtype=np.uint8)
    assert pack_bits(codes, 2) == bytes([1 | 2 << 2 | 3 << 4, 1])  # 4 codes per byte, LSB first
    assert pack_bits(np.array([0xA, 0x3, 0x7], np.uint8), 4) == bytes([0x3A, 0x07])  # 2 codes per byte
    for bits in (2, 4, 8):
        c = np.random.default_rng(bits).integers(0, 2**bits, 1001).astype(np.uint8)
        packed = pack_bits(c, bits)
        assert len(packed) == math.ceil(1001 * bits / 8)
        assert np.array_equal(unpack_bits(packed, bits, 1001), c)


def test_the_carrier_must_be_a_1d_uint8_tensor():
    with pytest.raises(MalformedPayloadError, match="uint8"):
        decode(torch.zeros(4), {"w": (1000,)}, ["w"], SPEC, 0)
    with pytest.raises(MalformedPayloadError, match="uint8"):
        payload_from_tensor(torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(MalformedPayloadError, match="bytes or a uint8 tensor"):
        decode([1, 2], {"w": (1000,)}, ["w"], SPEC, 0)


def expect_malformed(tensors, payload, *words, spec=SPEC, names=None):
    with pytest.raises(MalformedPayloadError) as info:
        decode(payload, {k: tuple(v.shape) for k, v in tensors.items()}, names or list(tensors), spec, 0)
    assert isinstance(info.value, ValueError) and isinstance(info.value, InvalidUpdateError)
    for word in words:
        assert word in str(info.value)


def test_header_is_version_2_with_a_crc():
    payload = encode({"w": torch.randn(3)}, ["w"], "float", 0)
    assert HEADER_NBYTES == 13 and FORMAT_VERSION == 2
    assert payload[:3] == b"PF\x02" and len(payload) == HEADER_NBYTES + 12
    header, _ = read_header(ByteReader(payload))
    assert header == Header(bits=32, sparsifier=0, transforms=0, keep_percent=100, count=1)
    header, _ = read_header(ByteReader(encode({"w": torch.randn(30)}, ["w"], "lq4+rot+topk10", 0)))
    assert header.codes() == (4, 2, 1, 10)


def test_a_flipped_byte_anywhere_fails_the_crc(mixed_tensors):
    payload = encode(mixed_tensors, list(mixed_tensors), SPEC, 0)
    # every body byte, and the header's spec codes and count (not magic/version: they are read first)
    for offset in [*range(4, HEADER_NBYTES), *range(HEADER_NBYTES, len(payload), 7), len(payload) - 1]:
        damaged = bytearray(payload)
        damaged[offset] ^= 0x10
        expect_malformed(mixed_tensors, bytes(damaged), "fails its CRC", "corrupted or truncated in transit")
    expect_malformed(mixed_tensors, payload[:-1], "fails its CRC")  # truncated in transit
    expect_malformed(mixed_tensors, payload + b"\0", "fails its CRC")


def test_malformed_payloads_are_rejected_with_the_reason(mixed_tensors, reseal):
    payload = encode(mixed_tensors, list(mixed_tensors), SPEC, 0)
    # behind a valid CRC (a buggy encoder): the reader names the tensor that runs out
    expect_malformed(mixed_tensors, reseal(payload[:-1]), "truncated", "'zeros'")
    expect_malformed(mixed_tensors, payload[:5], "truncated", "header")
    expect_malformed(mixed_tensors, reseal(payload + b"\0"), "1 trailing bytes")
    expect_malformed(mixed_tensors, payload[:2] + bytes([9]) + payload[3:], "format version 9")
    expect_malformed(mixed_tensors, b"XX" + payload[2:], "not a fedml_progfed compressed payload")
    expect_malformed(mixed_tensors, payload, "'lq4+topk10'", "'lq8+topk10'", spec="lq8+topk10")
    expect_malformed(mixed_tensors, payload, "'lq4+topk10'", "'lq4+sp10'", spec="lq4+sp10")
    expect_malformed(mixed_tensors, payload, "holds 6 tensors", names=["one", "seven"])
    unknown = bytearray(payload)
    unknown[3] = 5  # 5 bits per value: no such coding
    expect_malformed(mixed_tensors, reseal(bytes(unknown)), "unknown spec codes 5/2/0/10")
    # the decoder's shapes differ from the encoder's
    dense = encode(mixed_tensors, list(mixed_tensors), "lq4", 0)
    expect_malformed(dict(mixed_tensors, zeros=torch.zeros(40)), dense, "truncated", "'zeros'", spec="lq4")
    expect_malformed(dict(mixed_tensors, zeros=torch.zeros(30)), dense, "2 trailing bytes", spec="lq4")


def test_invalid_positions_are_rejected(reseal):
    tensors = {"w": torch.randn(1000)}
    # a mask whose bitmask has the wrong number of bits set
    p = bytearray(encode(tensors, ["w"], "topk10", 0))
    p[HEADER_NBYTES + TAG_NBYTES] ^= 0xFF
    with pytest.raises(MalformedPayloadError, match="'w' position mask has .* bits set"):
        decode(reseal(bytes(p)), {"w": (1000,)}, ["w"], "topk10", 0)
    # 'seed' is only valid for random sparsification
    p = bytearray(encode(tensors, ["w"], "topk10", 0))
    p[HEADER_NBYTES] = 0
    with pytest.raises(MalformedPayloadError, match="not valid"):
        decode(reseal(bytes(p)), {"w": (1000,)}, ["w"], "topk10", 0)
    # an unknown tag
    p[HEADER_NBYTES] = 77
    with pytest.raises(MalformedPayloadError, match="unknown tag 77"):
        decode(reseal(bytes(p)), {"w": (1000,)}, ["w"], "topk10", 0)
    # delta16 positions that run past the tensor
    x = torch.zeros(100_000)
    x[:1000] = 1.0
    p = bytearray(encode({"w": x}, ["w"], "topk1", 0))
    assert p[HEADER_NBYTES] == 2  # delta16
    p[HEADER_NBYTES + TAG_NBYTES : HEADER_NBYTES + TAG_NBYTES + 4] = b"\xff\xff\xff\xff"
    with pytest.raises(MalformedPayloadError, match="not strictly increasing"):
        decode(reseal(bytes(p)), {"w": (100_000,)}, ["w"], "topk1", 0)
