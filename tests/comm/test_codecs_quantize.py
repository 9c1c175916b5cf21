"""Linear quantization (Konečný et al. 2016, Sec. 3.2) and float32: exact sizes, unbiasedness, bad values."""

import math
import struct

import pytest
import torch

from fedml_progfed.comm.codecs import MalformedPayloadError, decode, encode, information_bits
from fedml_progfed.comm.codecs.quantize import MAX_ABS_SCALE, SCALE_NBYTES
from fedml_progfed.comm.codecs.wire_format import HEADER_NBYTES
from fedml_progfed.errors import InvalidUpdateError


def roundtrip(tensors, spec, seed=0):
    names = list(tensors)
    payload = encode(tensors, names, spec, seed)
    return payload, decode(payload, {k: tuple(v.shape) for k, v in tensors.items()}, names, spec, seed)


def test_float_is_exact_and_costs_header_plus_4n(mixed_tensors):
    payload, out = roundtrip(mixed_tensors, "float")
    for name, x in mixed_tensors.items():
        assert torch.equal(out[name], x)
    n = sum(x.numel() for x in mixed_tensors.values())
    assert len(payload) == HEADER_NBYTES + 4 * n


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_lq_sizes_are_exact(bits, mixed_tensors):
    payload, _ = roundtrip(mixed_tensors, f"lq{bits}")
    # per tensor: min and max as float32 (8 bytes) + ceil(n * bits / 8) packed codes
    expected = HEADER_NBYTES + sum(SCALE_NBYTES + math.ceil(x.numel() * bits / 8) for x in mixed_tensors.values())
    assert len(payload) == expected
    if bits == 8:
        assert len(payload) == HEADER_NBYTES + sum(x.numel() + 8 for x in mixed_tensors.values())


def test_lq8_is_a_quarter_of_float_for_100k_values():
    x = {"w": torch.randn(100_000)}
    lq8 = len(encode(x, ["w"], "lq8", 1))
    flt = len(encode(x, ["w"], "float", 1))
    assert lq8 == 100_000 + 8 + HEADER_NBYTES and flt == 400_000 + HEADER_NBYTES
    assert 0.25 <= lq8 / flt < 0.2501
    assert lq8 * 8 / information_bits("lq8", 100_000) < 1.0003  # wire efficiency ~ 1


@pytest.mark.parametrize("spec", ["lq2", "lq8+sp25"])
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


@pytest.mark.parametrize("spec", ["float", "lq8", "lq2+rot", "sp25", "topk10", "lq4+sp10"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_codec_refuses_non_finite_values_naming_the_tensor(spec, bad):
    tensors = {"ok": torch.ones(3), "w": torch.tensor([1.0, bad, 2.0])}
    with pytest.raises(ValueError, match="'w'.*NaN or infinite"):
        encode(tensors, ["ok", "w"], spec, 0)


def test_values_beyond_the_scale_bound_or_overflowing_cannot_be_encoded():
    with pytest.raises(ValueError, match="'w'.*MAX_ABS_SCALE"):
        encode({"w": torch.tensor([1.0, 3e38])}, ["w"], "lq8", 0)
    assert MAX_ABS_SCALE == 1e30
    out = decode(encode({"w": torch.tensor([-9.9e29, 9.9e29])}, ["w"], "lq8", 0), {"w": (2,)}, ["w"], "lq8", 0)
    assert torch.isfinite(out["w"]).all()  # just inside the bound: encoded and decoded
    # finite input that the n/k scale of sp1 pushes past float32
    with pytest.raises(ValueError, match="'w'.*overflow float32"):
        encode({"w": torch.full((100,), 1e37)}, ["w"], "sp1", 0)


@pytest.mark.parametrize(
    "lo, hi",
    [(-1.0, 3e38), (-3e38, 1.0), (float("nan"), 1.0), (0.0, float("nan")), (-float("inf"), 0.0), (2.0, 1.0)],
)
def test_invalid_scales_are_rejected_on_decode_naming_the_tensor(lo, hi, reseal):
    tensors = {"a": torch.randn(5), "w": torch.randn(10)}
    payload = bytearray(encode(tensors, ["a", "w"], "lq8", 0))
    at = HEADER_NBYTES + SCALE_NBYTES + 5  # w's scales follow a's scales and 5 codes
    payload[at : at + SCALE_NBYTES] = struct.pack("<ff", lo, hi)
    with pytest.raises(MalformedPayloadError, match="tensor 'w' has invalid quantization scales") as info:
        decode(reseal(bytes(payload)), {"a": (5,), "w": (10,)}, ["a", "w"], "lq8", 0)
    assert isinstance(info.value, InvalidUpdateError)
