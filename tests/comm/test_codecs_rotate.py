"""Randomized Hadamard rotation before quantizing (Suresh et al. 2017), in power-of-two blocks without padding."""

import math

import pytest
import torch

from fedml_progfed.comm.codecs import decode, encode
from fedml_progfed.comm.codecs.quantize import SCALE_NBYTES
from fedml_progfed.comm.codecs.rotate import ROTATION_BLOCK, block_hadamard, block_sizes, hadamard_rows, rotate, unrotate
from fedml_progfed.comm.codecs.stages import tensor_generator
from fedml_progfed.comm.codecs.wire_format import HEADER_NBYTES

AWKWARD = [1, 3, 1000, 1025, 4097]


def test_blocks_are_full_blocks_then_the_binary_decomposition_of_the_remainder():
    assert ROTATION_BLOCK == 1024
    assert block_sizes(0) == [] and block_sizes(1) == [1] and block_sizes(3) == [2, 1]
    assert block_sizes(1000) == [512, 256, 128, 64, 32, 8]
    assert block_sizes(1025) == [1024, 1]
    assert block_sizes(4097) == [1024] * 4 + [1]
    for n in [*AWKWARD, 2047, 3 * 1024]:
        sizes = block_sizes(n)
        assert sum(sizes) == n and all(s & (s - 1) == 0 for s in sizes)  # no padding, all powers of two
        assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("n", AWKWARD)
def test_rotation_is_an_exact_orthonormal_inverse_of_the_same_length(n):
    v = torch.randn(n, generator=torch.Generator().manual_seed(n))
    y = rotate(v, torch.Generator().manual_seed(4))
    assert y.numel() == n and math.isclose(float(y.norm()), float(v.norm()), rel_tol=1e-5)
    assert torch.allclose(unrotate(y, torch.Generator().manual_seed(4)), v, atol=1e-5)
    assert not torch.allclose(y, v)


@pytest.mark.parametrize("m", [1, 2, 8, 32, 128, ROTATION_BLOCK])
def test_hadamard_rows_is_the_orthonormal_walsh_hadamard_matrix(m):
    h = hadamard_rows(torch.eye(m))  # row i is H e_i: the matrix itself
    assert torch.allclose(h, h.T) and torch.allclose(h @ h, torch.eye(m), atol=1e-5)  # symmetric, own inverse
    assert torch.allclose(h.abs(), torch.full((m, m), 1 / math.sqrt(m)))  # every entry +-1/sqrt(m): full spreading
    if m >= 2:  # Sylvester order: H_m = [[H, H], [H, -H]]
        half = hadamard_rows(torch.eye(m // 2)) / math.sqrt(2)
        assert torch.allclose(h, torch.cat((torch.cat((half, half), 1), torch.cat((half, -half), 1)), 0), atol=1e-6)


def test_each_block_is_its_own_hadamard_transform():
    # a spike in the second full block spreads over that block only, evenly
    v = torch.zeros(2 * ROTATION_BLOCK + 3)
    v[ROTATION_BLOCK + 5] = 1.0
    y = block_hadamard(v)
    assert torch.equal(y[:ROTATION_BLOCK], torch.zeros(ROTATION_BLOCK))
    assert torch.allclose(y[ROTATION_BLOCK : 2 * ROTATION_BLOCK].abs(), torch.full((ROTATION_BLOCK,), 1 / 32))
    assert torch.equal(y[2 * ROTATION_BLOCK :], torch.zeros(3))
    assert torch.allclose(block_hadamard(y), v, atol=1e-6)  # its own inverse


@pytest.mark.parametrize("bits", [8, 2])
def test_rotation_costs_no_bytes_and_round_trips_within_quantization_error(bits):
    g = torch.Generator().manual_seed(3)
    tensors = {f"t{n}": torch.randn(n, generator=g) for n in AWKWARD}
    names = list(tensors)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    plain = encode(tensors, names, f"lq{bits}", 9)
    rotated = encode(tensors, names, f"lq{bits}+rot", 9)
    assert len(rotated) == len(plain)  # no padding at all
    out = decode(rotated, shapes, names, f"lq{bits}+rot", 9)
    for name, x in tensors.items():
        # stochastic rounding moves each rotated coordinate by less than one level, and the
        # inverse rotation is orthonormal, so the error's norm is at most sqrt(n) levels
        y = rotate(x, tensor_generator(9, name, "signs"))
        step = float(y.max() - y.min()) / (2**bits - 1)
        assert float((out[name] - x).norm()) <= math.sqrt(x.numel()) * step * (1 + 1e-4) + 1e-6


def test_a_single_value_is_still_exact_under_rotation():
    x = {"w": torch.tensor([0.3])}
    assert torch.equal(decode(encode(x, ["w"], "lq4+rot", 0), {"w": (1,)}, ["w"], "lq4+rot", 0)["w"], x["w"])


def test_rotation_helps_with_an_outlier():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, generator=g) * 0.01
    x[17] = 100.0  # one outlier stretches min/max and wastes every level on the rest
    payload = encode({"w": x}, ["w"], "lq8+rot", 5)
    assert len(payload) == HEADER_NBYTES + SCALE_NBYTES + 3000  # not padded to 4096
    err_plain = (decode(encode({"w": x}, ["w"], "lq8", 5), {"w": (3000,)}, ["w"], "lq8", 5)["w"] - x).pow(2).mean()
    err_rot = (decode(payload, {"w": (3000,)}, ["w"], "lq8+rot", 5)["w"] - x).pow(2).mean()
    assert err_rot < err_plain / 10


def test_rotation_with_sparsification_round_trips():
    x = {"w": torch.randn(5000, generator=torch.Generator().manual_seed(6))}
    for spec in ("lq8+rot+sp25", "lq4+rot+topk10"):
        payload = encode(x, ["w"], spec, 2)
        assert len(payload) == len(encode(x, ["w"], spec.replace("+rot", ""), 2))
        out = decode(payload, {"w": (5000,)}, ["w"], spec, 2)["w"]
        assert (out != 0).sum() <= 1250
