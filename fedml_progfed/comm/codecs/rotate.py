"""``rot``: randomized Hadamard rotation before quantizing (Suresh et al. 2017).

Multiplying by random signs and then by an orthonormal Walsh-Hadamard matrix
spreads an outlier over all coordinates, so per-tensor min/max quantization
wastes fewer of its levels on the empty range between the bulk and the outlier.
The decoder redraws the signs from the shared seed and applies the inverse.
"""

from __future__ import annotations

import math

import torch

from fedml_progfed.comm.codecs.spec import register_part, register_rule
from fedml_progfed.comm.codecs.stages import Transform, register_transform


def _next_pow2(k: int) -> int:
    return 1 << (k - 1).bit_length() if k > 0 else 0


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform of a power-of-two-length vector (its own inverse)."""
    m = x.numel()
    y = x
    h = 1
    while h < m:
        pairs = y.view(-1, 2, h)
        y = torch.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), dim=1).reshape(m)
        h *= 2
    return y / math.sqrt(m) if m else y


def random_signs(m: int, g: torch.Generator) -> torch.Tensor:
    """``m`` independent +-1 as float32."""
    return torch.randint(0, 2, (m,), generator=g, dtype=torch.int8).to(torch.float32) * 2 - 1


def rotate(values: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """H·D·pad(v): output length is the next power of two."""
    k = values.numel()
    padded = torch.zeros(_next_pow2(k), dtype=torch.float32)
    padded[:k] = values
    return fwht(padded * random_signs(padded.numel(), g))


def unrotate(rotated: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Inverse of :func:`rotate` (D·H is the inverse of H·D), cut back to ``k`` values."""
    return (fwht(rotated) * random_signs(rotated.numel(), g))[:k]


class HadamardRotation(Transform):
    """The ``rot`` transform; its random signs come from the tensor's ``signs`` stream."""

    field = "rotate"
    flag = 1
    purpose = "signs"

    def forward(self, values: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return rotate(values, g)

    def inverse(self, values: torch.Tensor, count: int, g: torch.Generator) -> torch.Tensor:
        return unrotate(values, count, g)

    def length(self, count: int) -> int:
        return _next_pow2(count)


register_transform(HadamardRotation())
register_part("rot", r"rot", "rotation", lambda m: {"rotate": True}, lambda spec: "rot" if spec.rotate else "")
register_rule(
    "rot needs lq",
    lambda spec: spec.rotate and not spec.quantized,
    "'rot' rotates values before quantizing, so it needs lq8, lq4 or lq2",
)
