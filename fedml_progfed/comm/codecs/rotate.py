"""``rot``: randomized Hadamard rotation before quantizing, in fixed blocks (after Suresh et al. 2017).

Multiplying by random signs D and then by an orthonormal Walsh-Hadamard matrix H
spreads an outlier over many coordinates, so per-tensor min/max quantization
wastes fewer of its levels on the empty range between the bulk and the outlier.
The decoder redraws the signs from the shared seed and applies the inverse D·H
(H is symmetric and its own inverse).

Why blocks. Suresh et al. (2017) rotate the whole vector once, which needs a
power-of-two length, so a tensor of n values is padded to the next power of two
and up to twice as many codes travel (a tensor of 2**j + 1 values nearly
doubles; ``lq8+rot`` cost ~44 % of float on ResNet-18 instead of ~25 %). Here
the vector is cut into blocks of :data:`ROTATION_BLOCK` values and the remainder
(< :data:`ROTATION_BLOCK`) into descending powers of two, its binary
decomposition (1000 = 512 + 256 + 128 + 64 + 32 + 8). Every block is a power of
two, so nothing is padded and ``lq8+rot`` sends exactly as many bytes as
``lq8``. Each block gets its own random signs and its own orthonormal transform;
min/max quantization stays per tensor. A block of 1024 still spreads an outlier
over 1024 coordinates (its magnitude drops ~32x); only the few small remainder
blocks (fewer than 1024 values per tensor) mix little.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from fedml_progfed.comm.codecs.spec import register_part, register_rule
from fedml_progfed.comm.codecs.stages import Transform, register_transform

# Values per rotation block: a power of two, large enough to spread an outlier, small
# enough that a tensor's remainder (at most ROTATION_BLOCK - 1 values) stays a small share.
ROTATION_BLOCK = 1024


def block_sizes(count: int) -> list[int]:
    """Sizes of the blocks ``count`` values are rotated in: full blocks, then the remainder's powers of two, descending."""
    full, rest = divmod(count, ROTATION_BLOCK)
    return [ROTATION_BLOCK] * full + [1 << b for b in range(rest.bit_length() - 1, -1, -1) if rest >> b & 1]


@lru_cache(maxsize=None)
def _sylvester(m: int) -> torch.Tensor:
    """The m x m Hadamard matrix of +-1 in Sylvester's (natural) order; m a power of two, at most 32 here."""
    h = torch.ones(1, 1)
    while h.shape[0] < m:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def hadamard_rows(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of each row of ``x`` (rows of power-of-two length; its own inverse).

    H_m = H_a ⊗ H_b with a * b = m, so with a row viewed as an a x b matrix X the
    transform is H_a X H_b: two small matrix products (a, b <= 32 for blocks of 1024),
    several times faster on CPU than the log2(m) butterfly passes of a fast WHT.
    """
    rows, m = x.shape
    a = 1 << ((m.bit_length() - 1) // 2)
    b = m // a
    y = _sylvester(a) @ x.reshape(rows, a, b) @ _sylvester(b)  # H is symmetric: H_b^T = H_b
    return y.reshape(rows, m) / math.sqrt(m)


def block_hadamard(values: torch.Tensor) -> torch.Tensor:
    """H applied to every block of :func:`block_sizes` (full blocks in one batched call); its own inverse."""
    out = torch.empty_like(values)
    full = values.numel() // ROTATION_BLOCK * ROTATION_BLOCK
    if full:
        out[:full] = hadamard_rows(values[:full].reshape(-1, ROTATION_BLOCK)).reshape(-1)
    start = full
    for size in block_sizes(values.numel() - full):
        out[start : start + size] = hadamard_rows(values[start : start + size].reshape(1, size)).reshape(-1)
        start += size
    return out


def random_signs(count: int, g: torch.Generator) -> torch.Tensor:
    """``count`` independent +-1 as float32."""
    return torch.randint(0, 2, (count,), generator=g, dtype=torch.int8).to(torch.float32) * 2 - 1


def rotate(values: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """H·D·v per block: same length as ``values``, same norm.

    The signs are one draw of ``len(values)`` from ``g`` (the tensor's ``signs`` stream),
    so each block has its own independent signs and the decoder redraws them all at once.
    """
    return block_hadamard(values * random_signs(values.numel(), g))


def unrotate(rotated: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Inverse of :func:`rotate` given the same generator seed: D·H per block."""
    return block_hadamard(rotated) * random_signs(rotated.numel(), g)


class HadamardRotation(Transform):
    """The ``rot`` transform; its random signs come from the tensor's ``signs`` stream."""

    field = "rotate"
    flag = 1
    purpose = "signs"

    def forward(self, values: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return rotate(values, g)

    def inverse(self, values: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return unrotate(values, g)


register_transform(HadamardRotation())
register_part("rot", r"rot", "rotation", lambda m: {"rotate": True}, lambda spec: "rot" if spec.rotate else "")
register_rule(
    "rot needs lq",
    lambda spec: spec.rotate and not spec.quantized,
    "'rot' rotates values before quantizing, so it needs lq8, lq4 or lq2",
)
