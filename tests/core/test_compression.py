"""Wire codec: exact byte sizes, round trips, unbiasedness, position layouts, error feedback, bad input.

ProgFed Sec. 4.4 / Tables 5, 11 (LQ-X, SP-X following Konečný et al. 2016);
Suresh et al. 2017 (rotation); Stich et al. 2018, Karimireddy et al. 2019 (error feedback).
"""

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedml_progfed.core import wire
from fedml_progfed.core.compression import (
    HEADER_NBYTES,
    SCALE_NBYTES,
    TAG_NBYTES,
    Codec,
    CompressionSpec,
    ErrorFeedback,
    MalformedPayloadError,
    decode,
    encode,
    information_bits,
    pack_bits,
    parse_spec,
    payload_from_tensor,
    payload_layouts,
    payload_to_tensor,
    rotate,
    unpack_bits,
    unrotate,
)
from fedml_progfed.errors import ConfigError, InvalidUpdateError

KEY = "progfed_args.progfed_compression_up"
SPECS = ["float", "lq8", "lq4", "lq2", "lq8+rot", "sp25", "sp10", "topk10", "lq8+sp25", "lq8+sp10", "lq4+topk10"]


def mixed_tensors() -> "OrderedDict[str, torch.Tensor]":
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        [
            ("one", torch.randn(1, generator=g)),
            ("seven", torch.randn(7, generator=g)),
            ("fc.weight", torch.randn(1000, generator=g)),
            ("conv.weight", torch.randn(3, 3, 3, 16, generator=g)),
            ("constant", torch.full((5, 4), 0.37)),
            ("zeros", torch.zeros(33)),
        ]
    )


def shapes_of(tensors):
    return {k: tuple(v.shape) for k, v in tensors.items()}


def roundtrip(tensors, spec, seed=0):
    names = list(tensors)
    payload = encode(tensors, names, spec, seed)
    return payload, decode(payload, shapes_of(tensors), names, spec, seed)


# ----------------------------------------------------------------------------- round trips and sizes


@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_round_trips_shapes_and_dtypes(spec):
    tensors = mixed_tensors()
    payload, out = roundtrip(tensors, spec, seed=3)
    assert isinstance(payload, bytes)
    assert list(out) == list(tensors)
    for name, x in tensors.items():
        assert out[name].shape == x.shape and out[name].dtype == torch.float32
        assert torch.isfinite(out[name]).all()
    assert torch.equal(out["zeros"], tensors["zeros"])  # zero stays zero under every spec
    assert torch.equal(out["one"], tensors["one"]) or parse_spec(spec, KEY).rotate  # a single value is its own min and max
    parsed = parse_spec(spec, KEY)
    if parsed.sparsifier is None and not parsed.rotate:
        assert torch.equal(out["constant"], tensors["constant"])  # min == max: exact
    if parsed.quantized and parsed.sparsifier is None and not parsed.rotate:
        for name, x in tensors.items():  # stochastic rounding moves a value by less than one level
            step = float(x.max() - x.min()) / (2**parsed.bits - 1)
            assert float((out[name] - x).abs().max()) <= step * (1 + 1e-5) + 1e-7
    # the same seed gives the same bytes (client and server can both reproduce it)
    assert encode(tensors, list(tensors), spec, 3) == payload


def test_float_is_exact_and_costs_header_plus_4n():
    tensors = mixed_tensors()
    payload, out = roundtrip(tensors, "float")
    for name, x in tensors.items():
        assert torch.equal(out[name], x)
    n = sum(x.numel() for x in tensors.values())
    assert HEADER_NBYTES == 8 and len(payload) == HEADER_NBYTES + 4 * n


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_lq_sizes_are_exact(bits):
    tensors = mixed_tensors()
    payload, _ = roundtrip(tensors, f"lq{bits}")
    # per tensor: min and max as float32 (8 bytes) + ceil(n * bits / 8) packed codes
    expected = HEADER_NBYTES + sum(SCALE_NBYTES + math.ceil(x.numel() * bits / 8) for x in tensors.values())
    assert len(payload) == expected
    if bits == 8:
        assert len(payload) == 8 + sum(x.numel() + 8 for x in tensors.values())


def test_lq8_is_a_quarter_of_float_for_100k_values():
    x = {"w": torch.randn(100_000)}
    lq8 = len(encode(x, ["w"], "lq8", 1))
    flt = len(encode(x, ["w"], "float", 1))
    assert lq8 == 100_000 + 8 + 8 and flt == 400_000 + 8
    assert 0.25 <= lq8 / flt < 0.2501
    assert lq8 * 8 / information_bits("lq8", 100_000) < 1.0002  # wire efficiency ~ 1


def test_rotation_padding_size_and_outlier_benefit():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, generator=g) * 0.01
    x[17] = 100.0  # one outlier stretches min/max and wastes every level on the rest
    payload = encode({"w": x}, ["w"], "lq8+rot", 5)
    assert len(payload) == HEADER_NBYTES + SCALE_NBYTES + 4096  # padded to the next power of two
    err_plain = (decode(encode({"w": x}, ["w"], "lq8", 5), {"w": (3000,)}, ["w"], "lq8", 5)["w"] - x).pow(2).mean()
    err_rot = (decode(payload, {"w": (3000,)}, ["w"], "lq8+rot", 5)["w"] - x).pow(2).mean()
    assert err_rot < err_plain / 10


def test_rotation_is_an_exact_orthonormal_inverse():
    v = torch.randn(37)
    y = rotate(v, torch.Generator().manual_seed(4))
    assert y.numel() == 64 and math.isclose(float(y.norm()), float(v.norm()), rel_tol=1e-5)
    assert torch.allclose(unrotate(y, 37, torch.Generator().manual_seed(4)), v, atol=1e-5)


def test_bit_packing_layout():
    codes = np.array([1, 2, 3, 0, 1], dtype=np.uint8)
    assert pack_bits(codes, 2) == bytes([1 | 2 << 2 | 3 << 4, 1])  # 4 codes per byte, LSB first
    assert pack_bits(np.array([0xA, 0x3, 0x7], np.uint8), 4) == bytes([0x3A, 0x07])  # 2 codes per byte
    for bits in (2, 4, 8):
        c = np.random.default_rng(bits).integers(0, 2**bits, 1001).astype(np.uint8)
        packed = pack_bits(c, bits)
        assert len(packed) == math.ceil(1001 * bits / 8)
        assert np.array_equal(unpack_bits(packed, bits, 1001), c)


# ----------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize("spec", ["lq2", "sp10", "lq8+sp25"])
def test_unbiased_over_seeds(spec):
    g = torch.Generator().manual_seed(2)
    x = {"w": torch.randn(200, generator=g) + 0.3}
    draws = torch.stack([roundtrip(x, spec, seed)[1]["w"] for seed in range(400)])
    mean, var = draws.mean(0), draws.var(0)
    target = x["w"]
    # unbiased: E||mean - x||^2 = sum_i Var_i / S, so the ratio is ~1 (a bias adds ||bias||^2 on top);
    # a per-entry z-score would be fooled by entries lying on a level (variance ~0 in 400 draws)
    ratio = float((mean - target).pow(2).sum() / (var.sum() / 400))
    assert 0.4 < ratio < 2.0
    slope = float((mean * target).sum() / (target * target).sum())
    assert abs(slope - 1) < 0.03  # no overall shrinkage (e.g. a missing 1/p)
    assert float((draws[0] - target).abs().mean()) > 4 * float((mean - target).abs().mean())  # averaging helps


def test_topk_is_deterministic_and_keeps_exactly_the_top_ten_percent():
    x = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(3))}
    p1, out1 = roundtrip(x, "topk10", seed=1)
    p2, out2 = roundtrip(x, "topk10", seed=99)
    assert p1 == p2 and torch.equal(out1["w"], out2["w"])
    kept = torch.nonzero(out1["w"]).flatten()
    top = torch.topk(x["w"].abs(), 100).indices.sort().values
    assert torch.equal(kept, top)
    assert torch.equal(out1["w"][kept], x["w"][kept])  # no scaling: biased, but exact where kept


# ----------------------------------------------------------------------------- position layouts


def layout_and_size(x, spec):
    payload = encode({"w": x}, ["w"], spec, 7)
    return payload_layouts(payload, {"w": tuple(x.shape)}, ["w"], spec, 7)["w"], len(payload)


def test_random_sparsification_sends_no_positions():
    layout, size = layout_and_size(torch.randn(1000), "sp25")
    assert layout == "seed" and size == HEADER_NBYTES + TAG_NBYTES + 4 * 250
    layout, size = layout_and_size(torch.randn(1000), "lq8+sp10")
    assert layout == "seed" and size == HEADER_NBYTES + TAG_NBYTES + SCALE_NBYTES + 100
    assert layout_and_size(torch.randn(1), "sp10") == ("all", HEADER_NBYTES + TAG_NBYTES + 4)  # k == n


def test_topk_picks_the_smallest_position_layout():
    # large, 10 %: bitmask n/8 = 12500 beats 2k = 20000
    layout, size = layout_and_size(torch.randn(100_000), "topk10")
    assert layout == "mask" and size == HEADER_NBYTES + TAG_NBYTES + 12_500 + 4 * 10_000
    # tiny, 10 % of 7 = 1 kept: mask 1 byte beats a 2-byte delta
    assert layout_and_size(torch.randn(7), "topk10") == ("mask", HEADER_NBYTES + TAG_NBYTES + 1 + 4)
    # tiny, 5 % of 20 = 1 kept: one 2-byte delta beats a 3-byte mask
    assert layout_and_size(torch.randn(20), "topk5") == ("delta16", HEADER_NBYTES + TAG_NBYTES + 2 + 4)
    # large, 1 %: 2k = 2000 beats 12500
    layout, size = layout_and_size(torch.randn(100_000), "lq8+topk1")
    assert layout == "delta16" and size == HEADER_NBYTES + TAG_NBYTES + 2000 + SCALE_NBYTES + 1000
    # a gap over 65535 between kept entries: uint32 indices (4k = 8000) beat the mask (25000)
    x = torch.zeros(200_000)
    x[:1999] = torch.arange(1, 2000, dtype=torch.float32)
    x[199_999] = 5000.0
    layout, size = layout_and_size(x, "topk1")
    assert layout == "index32" and size == HEADER_NBYTES + TAG_NBYTES + 8000 + 4 * 2000
    out = decode(encode({"w": x}, ["w"], "topk1", 0), {"w": (200_000,)}, ["w"], "topk1", 0)["w"]
    assert torch.equal(out, x)


# ----------------------------------------------------------------------------- error feedback


def test_error_feedback_residual_and_recovery_of_the_sum():
    x = torch.randn(500, generator=torch.Generator().manual_seed(5))
    ef = ErrorFeedback()
    p1 = ef.compress({"w": x}, ["w"], "topk10", 1)
    d1 = decode(p1, {"w": (500,)}, ["w"], "topk10", 1)["w"]
    r1 = x - d1
    assert torch.equal(ef.state_dict()["w"], r1)
    p2 = ef.compress({"w": x}, ["w"], "topk10", 2)
    d2 = decode(p2, {"w": (500,)}, ["w"], "topk10", 2)["w"]
    assert torch.allclose(ef.state_dict()["w"], x + r1 - d2)
    assert torch.equal(d2, torch.where(d2 != 0, x + r1, torch.zeros(())))  # top-k of the corrected update

    # over many rounds the decoded sum tracks the input sum (it differs by the last residual only)
    rounds = 80
    ef, sent, plain = ErrorFeedback(), torch.zeros(500), torch.zeros(500)
    inputs = [torch.randn(500, generator=torch.Generator().manual_seed(100 + t)) + 0.2 for t in range(rounds)]
    for t, xt in enumerate(inputs):
        sent += decode(ef.compress({"w": xt}, ["w"], "topk10", t), {"w": (500,)}, ["w"], "topk10", t)["w"]
        plain += decode(encode({"w": xt}, ["w"], "topk10", t), {"w": (500,)}, ["w"], "topk10", t)["w"]
    total = torch.stack(inputs).sum(0)
    assert torch.allclose(sent + ef.residuals["w"], total, atol=1e-3)
    rel = lambda s: float((s - total).norm() / total.norm())  # noqa: E731
    assert rel(sent) < 0.35 and rel(sent) < rel(plain) / 2


def test_error_feedback_follows_growth_and_checkpoints():
    ef = ErrorFeedback()
    ef.compress({"block1": torch.randn(50), "head1": torch.randn(10)}, ["block1", "head1"], "lq2", 0)
    kept = ef.state_dict()["block1"].clone()
    new = {"block1": torch.zeros(50), "block2": torch.randn(40), "head2": torch.randn(10)}
    payload = ef.compress(new, ["block1", "block2", "head2"], "lq2", 1)
    assert set(ef.residuals) == {"block1", "block2", "head2"}  # the old head is dropped
    shapes = shapes_of(new)
    out = decode(payload, shapes, list(new), "lq2", 1)
    assert torch.allclose(ef.residuals["block1"], kept - out["block1"])  # surviving residual was added
    assert torch.allclose(ef.residuals["block2"], new["block2"] - out["block2"])  # new name starts at zero
    clone = ErrorFeedback()
    clone.load_state_dict(ef.state_dict())
    assert ef.compress(new, list(new), "lq2", 2) == clone.compress(new, list(new), "lq2", 2)


# ----------------------------------------------------------------------------- malformed input


def good_payload():
    tensors = mixed_tensors()
    return tensors, encode(tensors, list(tensors), "lq4+topk10", 0)


def expect_malformed(payload, *words, spec="lq4+topk10", names=None):
    tensors = mixed_tensors()
    with pytest.raises(MalformedPayloadError) as info:
        decode(payload, shapes_of(tensors), names or list(tensors), spec, 0)
    assert isinstance(info.value, ValueError) and isinstance(info.value, InvalidUpdateError)
    for word in words:
        assert word in str(info.value)


def test_malformed_payloads_are_rejected_with_the_reason():
    _, payload = good_payload()
    expect_malformed(payload[:-1], "truncated", "'zeros'")
    expect_malformed(payload[:5], "truncated", "header")
    expect_malformed(payload + b"\0", "1 trailing bytes")
    expect_malformed(payload[:2] + bytes([9]) + payload[3:], "format version 9")
    expect_malformed(b"XX" + payload[2:], "not a fedml_progfed compressed payload")
    expect_malformed(payload, "'lq4+topk10'", "'lq8+topk10'", spec="lq8+topk10")
    expect_malformed(payload, "holds 6 tensors", names=["one", "seven"])
    # a mask tag whose bitmask has the wrong number of bits set
    tensors = {"w": torch.randn(1000)}
    p = bytearray(encode(tensors, ["w"], "topk10", 0))
    p[HEADER_NBYTES + TAG_NBYTES] ^= 0xFF
    with pytest.raises(MalformedPayloadError, match="bits set"):
        decode(bytes(p), {"w": (1000,)}, ["w"], "topk10", 0)
    p = bytearray(encode(tensors, ["w"], "topk10", 0))
    p[HEADER_NBYTES] = 0  # 'seed' is only valid for random sparsification
    with pytest.raises(MalformedPayloadError, match="not valid"):
        decode(bytes(p), {"w": (1000,)}, ["w"], "topk10", 0)
    with pytest.raises(MalformedPayloadError, match="uint8"):
        decode(torch.zeros(4), {"w": (1000,)}, ["w"], "topk10", 0)


def test_non_finite_values_cannot_be_quantized():
    with pytest.raises(ValueError, match="'w'.*NaN"):
        encode({"w": torch.tensor([1.0, float("nan")])}, ["w"], "lq8", 0)


# ----------------------------------------------------------------------------- spec parsing


def test_spec_parsing_and_canonical_text():
    assert parse_spec("lq8+sp25", KEY) == CompressionSpec(bits=8, sparsifier="random", keep_percent=25)
    assert parse_spec(" SP25 + lq8 ", KEY).text == "lq8+sp25"
    assert parse_spec("lq4+topk10+ef", KEY).error_feedback
    assert parse_spec("ef+rot+lq2", KEY).text == "lq2+rot+ef"
    assert parse_spec("float", KEY).lossless
    assert information_bits("float", 10) == 320
    assert information_bits("lq8+sp25", 1000) == 8 * 250
    assert information_bits("lq2+rot", 1000) == 2000  # rotation padding is overhead, not information


@pytest.mark.parametrize(
    "text, words",
    [
        ("lq3", ["unknown compression part 'lq3'", "lq8 | lq4 | lq2", "sp<1-99>"]),
        ("qsgd", ["unknown compression part 'qsgd'"]),
        ("sp100", ["unknown compression part 'sp100'"]),
        ("lq8+lq4", ["two values parts"]),
        ("sp25+topk10", ["two sparsifier parts"]),
        ("rot", ["needs lq8, lq4 or lq2"]),
        ("float+ef", ["'ef' needs a lossy part"]),
        ("", ["expected a compression spec string"]),
    ],
)
def test_bad_specs_name_the_key(text, words):
    key = "progfed_args.progfed_compression_down"
    with pytest.raises(ConfigError) as info:
        parse_spec(text, key)
    message = str(info.value)
    assert message.startswith(key)
    for word in words:
        assert word in message


# ----------------------------------------------------------------------------- codec and wire tensor


def test_codec_travels_as_one_uint8_tensor():
    tensors = mixed_tensors()
    codec = Codec("lq8+sp25", KEY)
    assert not codec.error_feedback and codec.information_bits(1000) == 2000
    payload = codec.encode(tensors, list(tensors), seed=11)
    as_tensor = payload_to_tensor(payload)
    assert as_tensor.dtype == torch.uint8 and as_tensor.dim() == 1
    assert wire.payload_nbytes({"payload": as_tensor}) == len(payload)  # bytes counted = bytes encoded
    assert payload_from_tensor(as_tensor) == payload
    a = codec.decode(as_tensor, shapes_of(tensors), list(tensors), seed=11)
    b = decode(payload, shapes_of(tensors), list(tensors), "lq8+sp25", 11)
    assert all(torch.equal(a[k], b[k]) for k in tensors)


def test_codec_error_feedback_needs_a_memory():
    tensors = {"w": torch.randn(100)}
    codec = Codec("topk10+ef", KEY)
    assert codec.error_feedback
    with pytest.raises(ValueError, match="ErrorFeedback memory"):
        codec.encode(tensors, ["w"], seed=0)
    memory = codec.new_memory()
    payload = codec.encode(tensors, ["w"], seed=0, memory=memory)
    assert payload == encode(tensors, ["w"], "topk10", 0)  # 'ef' changes what is sent, not the format
    assert "w" in memory.residuals
    with pytest.raises(ValueError, match="no 'ef'"):
        Codec("topk10", KEY).encode(tensors, ["w"], seed=0, memory=memory)
