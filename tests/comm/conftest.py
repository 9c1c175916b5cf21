"""Shared tensors for the codec tests: tiny, with the awkward cases (one value, a constant, zeros)."""

from collections import OrderedDict

import pytest
import torch


def make_mixed_tensors() -> "OrderedDict[str, torch.Tensor]":
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


@pytest.fixture
def mixed_tensors() -> "OrderedDict[str, torch.Tensor]":
    """Six tensors of 1 to 1000 values, including a constant and an all-zero one."""
    return make_mixed_tensors()


def _reseal(payload: bytes) -> bytes:
    from fedml_progfed.comm.codecs.wire_format import HEADER_NBYTES, ByteReader, read_header, seal

    header, _ = read_header(ByteReader(payload))
    return seal(header, bytes(payload[HEADER_NBYTES:]))


@pytest.fixture
def reseal():
    """Re-stamp a tampered payload's CRC, to reach the checks behind it (as a buggy encoder would)."""
    return _reseal
