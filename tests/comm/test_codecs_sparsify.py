"""Random sparsification (Konečný et al. 2016), top-k (Stich et al. 2018) and their position layouts."""

import pytest
import torch

from fedml_progfed.comm.codecs import decode, encode, payload_layouts
from fedml_progfed.comm.codecs.quantize import SCALE_NBYTES
from fedml_progfed.comm.codecs.sparsify import TAG_NBYTES
from fedml_progfed.comm.codecs.stages import SPARSIFIERS, Sparsifier, register_sparsifier
from fedml_progfed.comm.codecs.wire_format import HEADER_NBYTES


def roundtrip(tensors, spec, seed=0):
    names = list(tensors)
    payload = encode(tensors, names, spec, seed)
    return payload, decode(payload, {k: tuple(v.shape) for k, v in tensors.items()}, names, spec, seed)


def layout_and_size(x, spec):
    payload = encode({"w": x}, ["w"], spec, 7)
    return payload_layouts(payload, {"w": tuple(x.shape)}, ["w"], spec, 7)["w"], len(payload)


def test_random_sparsification_is_unbiased_over_seeds():
    g = torch.Generator().manual_seed(2)
    x = {"w": torch.randn(200, generator=g) + 0.3}
    draws = torch.stack([roundtrip(x, "sp10", seed)[1]["w"] for seed in range(400)])
    mean, var = draws.mean(0), draws.var(0)
    target = x["w"]
    ratio = float((mean - target).pow(2).sum() / (var.sum() / 400))  # ~1 when unbiased (see the lq test)
    assert 0.4 < ratio < 2.0
    slope = float((mean * target).sum() / (target * target).sum())
    assert abs(slope - 1) < 0.03  # the n/k scale is there
    assert float((draws[0] - target).abs().mean()) > 4 * float((mean - target).abs().mean())


def test_random_sparsification_keeps_k_entries_scaled_by_n_over_k():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    _, out = roundtrip({"w": x}, "sp25", seed=4)
    kept = torch.nonzero(out["w"]).flatten()
    assert kept.numel() == 250
    assert torch.allclose(out["w"][kept], x[kept] * 4)
    assert not torch.equal(kept, torch.nonzero(roundtrip({"w": x}, "sp25", seed=5)[1]["w"]).flatten())  # seed-dependent


def test_topk_is_deterministic_and_keeps_exactly_the_top_ten_percent():
    x = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(3))}
    p1, out1 = roundtrip(x, "topk10", seed=1)
    p2, out2 = roundtrip(x, "topk10", seed=99)
    assert p1 == p2 and torch.equal(out1["w"], out2["w"])
    kept = torch.nonzero(out1["w"]).flatten()
    top = torch.topk(x["w"].abs(), 100).indices.sort().values
    assert torch.equal(kept, top)
    assert torch.equal(out1["w"][kept], x["w"][kept])  # no scaling: biased, but exact where kept


def test_random_sparsification_sends_no_positions():
    layout, size = layout_and_size(torch.randn(1000), "sp25")
    assert layout == "seed" and size == HEADER_NBYTES + TAG_NBYTES + 4 * 250
    layout, size = layout_and_size(torch.randn(1000), "lq8+sp10")
    assert layout == "seed" and size == HEADER_NBYTES + TAG_NBYTES + SCALE_NBYTES + 100
    assert layout_and_size(torch.randn(1), "sp10") == ("all", HEADER_NBYTES + TAG_NBYTES + 4)  # k == n
    assert layout_and_size(torch.randn(4), "lq8") == ("dense", HEADER_NBYTES + SCALE_NBYTES + 4)  # no sparsifier


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


def test_a_sparsifier_code_is_unique():
    class Clash(Sparsifier):
        name, code = "clash", SPARSIFIERS["topk"].code

        def select(self, x, k, positions):
            return torch.arange(k)

    with pytest.raises(ValueError, match="header code"):
        register_sparsifier(Clash())
    assert "clash" not in SPARSIFIERS
