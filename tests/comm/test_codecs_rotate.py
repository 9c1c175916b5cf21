"""Randomized Hadamard rotation before quantizing (Suresh et al. 2017)."""

import math

import torch

from fedml_progfed.comm.codecs import decode, encode
from fedml_progfed.comm.codecs.quantize import SCALE_NBYTES
from fedml_progfed.comm.codecs.rotate import rotate, unrotate
from fedml_progfed.comm.codecs.wire_format import HEADER_NBYTES


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
