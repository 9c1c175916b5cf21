"""The whole codec: every spec round-trips, is reproducible from its seed, and travels as one uint8 tensor.

ProgFed Sec. 4.4 / Tables 5, 11 (LQ-X, SP-X following Konečný et al. 2016).
"""


import pytest
import torch

from fedml_progfed.comm.codecs import (
    Codec,
    decode,
    encode,
    parse_spec,
    payload_from_tensor,
    payload_to_tensor,
)
from fedml_progfed.comm.messages import nbytes

SPECS = ["float", "lq8", "lq4", "lq2", "lq8+rot", "sp25", "sp10", "topk10", "lq8+sp25", "lq8+sp10", "lq4+topk10"]


def shapes_of(tensors):
    return {k: tuple(v.shape) for k, v in tensors.items()}


@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_round_trips_shapes_and_dtypes(spec, mixed_tensors):
    tensors = mixed_tensors
    payload = encode(tensors, list(tensors), spec, 3)
    out = decode(payload, shapes_of(tensors), list(tensors), spec, 3)
    assert isinstance(payload, bytes)
    assert list(out) == list(tensors)
    for name, x in tensors.items():
        assert out[name].shape == x.shape and out[name].dtype == torch.float32
        assert torch.isfinite(out[name]).all()
    assert torch.equal(out["zeros"], tensors["zeros"])  # zero stays zero under every spec
    parsed = parse_spec(spec)
    assert torch.equal(out["one"], tensors["one"])  # a single value is its own min and max (rotated: times +-1)
    if parsed.sparsifier is None and not parsed.rotate:
        assert torch.equal(out["constant"], tensors["constant"])  # min == max: exact
    if parsed.quantized and parsed.sparsifier is None and not parsed.rotate:
        for name, x in tensors.items():  # stochastic rounding moves a value by less than one level
            step = float(x.max() - x.min()) / (2**parsed.bits - 1)
            assert float((out[name] - x).abs().max()) <= step * (1 + 1e-5) + 1e-7
    # the same seed gives the same bytes (client and server can both reproduce it)
    assert encode(tensors, list(tensors), spec, 3) == payload


@pytest.mark.parametrize("spec", ["float", "lq8", "lq2+rot", "sp25", "topk10", "lq4+sp10"])
def test_empty_tensors_round_trip(spec):
    tensors = {"empty": torch.zeros(0, 3), "w": torch.randn(5)}
    out = decode(encode(tensors, ["empty", "w"], spec, 0), shapes_of(tensors), ["empty", "w"], spec, 0)
    assert out["empty"].shape == (0, 3)


def test_missing_tensors_and_shapes_are_named():
    with pytest.raises(ValueError, match="'b' is listed in names but missing"):
        encode({"a": torch.ones(2)}, ["a", "b"], "lq8", 0)
    payload = encode({"a": torch.ones(2)}, ["a"], "lq8", 0)
    with pytest.raises(ValueError, match="'a' is listed in names but has no shape"):
        decode(payload, {}, ["a"], "lq8", 0)


def test_codec_travels_as_one_uint8_tensor(mixed_tensors):
    tensors = mixed_tensors
    codec = Codec("lq8+sp25")
    assert codec.spec == parse_spec("lq8+sp25") and repr(codec) == "Codec('lq8+sp25')"
    assert not codec.error_feedback and codec.information_bits(1000) == 2000
    payload = codec.encode(tensors, list(tensors), seed=11)
    as_tensor = payload_to_tensor(payload)
    assert as_tensor.dtype == torch.uint8 and as_tensor.dim() == 1
    assert nbytes({"payload": as_tensor}) == len(payload)  # bytes counted = bytes encoded
    assert payload_from_tensor(as_tensor) == payload
    a = codec.decode(as_tensor, shapes_of(tensors), list(tensors), seed=11)
    b = decode(payload, shapes_of(tensors), list(tensors), "lq8+sp25", 11)
    assert all(torch.equal(a[k], b[k]) for k in tensors)


def test_codec_error_feedback_needs_a_memory():
    tensors = {"w": torch.randn(100)}
    codec = Codec("topk10+ef")
    assert codec.error_feedback
    with pytest.raises(ValueError, match="ErrorFeedback memory"):
        codec.encode(tensors, ["w"], seed=0)
    memory = codec.new_memory()
    payload = codec.encode(tensors, ["w"], seed=0, memory=memory)
    assert payload == encode(tensors, ["w"], "topk10", 0)  # 'ef' changes what is sent, not the format
    assert "w" in memory.residuals
    with pytest.raises(ValueError, match="no 'ef'"):
        Codec("topk10").encode(tensors, ["w"], seed=0, memory=memory)
