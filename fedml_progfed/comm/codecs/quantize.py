"""``lq8 | lq4 | lq2``: linear quantization with stochastic rounding, min/max per tensor.

Konečný et al. (2016), Sec. 3.2, as used by ProgFed (Sec. 4.4, LQ-X); the
stochastic rounding makes the estimate unbiased (also Alistarh et al. 2017,
QSGD). Each tensor sends its min and max as float32, then one b-bit code per
value packed LSB-first.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from fedml_progfed.comm.codecs.spec import register_part
from fedml_progfed.comm.codecs.stages import ValueCoding, register_value_coding
from fedml_progfed.comm.codecs.wire_format import ByteReader, pack_bits, packed_nbytes, unpack_bits

QUANTIZATION_BITS = (8, 4, 2)
_SCALE = struct.Struct("<ff")
SCALE_NBYTES = _SCALE.size  # 8: min and max as float32
# Largest |min| or |max| a payload may carry. Far above any sane update, far below
# float32's 3.4e38, so decoded values (and a 32x rotation gain on them) and their sums
# over clients stay finite; scales beyond it can only come from a diverged or corrupt sender.
MAX_ABS_SCALE = 1e30


class LinearQuantizer(ValueCoding):
    """min/max linear quantization to ``bits`` bits with stochastic rounding.

    min/max rather than a single absmax: 2**b levels span the actual range (absmax
    spends one code on symmetry and wastes the empty side of a skewed range, which hurts
    most at 2 bits), and a constant tensor is exact. Costs 4 more bytes per tensor.

    Parameters
    ----------
    bits
        8, 4 or 2 bits per value.
    """

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.levels = (1 << bits) - 1

    def encode(self, values: torch.Tensor, name: str, rounding: torch.Generator) -> bytes:
        n = values.numel()
        lo, hi = (float(values.min()), float(values.max())) if n else (0.0, 0.0)
        if not _valid_scales(lo, hi):
            raise ValueError(
                f"cannot quantize tensor {name!r}: its values span [{lo:.3g}, {hi:.3g}], "
                f"beyond MAX_ABS_SCALE = {MAX_ABS_SCALE:g} (a diverged update?)"
            )
        if hi > lo:
            # float64: (hi - lo) may be tiny or overflow float32; E[code] = u keeps it unbiased
            u = (values.double() - lo) * (self.levels / (hi - lo))
            noise = torch.rand(n, generator=rounding, dtype=torch.float64)
            codes = torch.floor(u + noise).clamp_(0, self.levels).to(torch.uint8)
        else:
            codes = torch.zeros(n, dtype=torch.uint8)  # constant: min == max is exact
        return _SCALE.pack(lo, hi) + pack_bits(codes.numpy(), self.bits)

    def decode(self, reader: ByteReader, count: int) -> torch.Tensor:
        lo, hi = _SCALE.unpack(reader.take(SCALE_NBYTES))
        if not _valid_scales(lo, hi) or hi < lo:
            raise reader.error(
                f"has invalid quantization scales min={lo!r}, max={hi!r} "
                f"(they must be finite, min <= max and at most {MAX_ABS_SCALE:g} in magnitude)"
            )
        codes = unpack_bits(reader.take(packed_nbytes(count, self.bits)), self.bits, count)
        step = (hi - lo) / self.levels
        return (torch.from_numpy(codes.astype(np.float64)) * step + lo).to(torch.float32)


def _valid_scales(lo: float, hi: float) -> bool:
    # written so that NaN fails too
    return abs(lo) <= MAX_ABS_SCALE and abs(hi) <= MAX_ABS_SCALE


for _bits in QUANTIZATION_BITS:
    register_value_coding(LinearQuantizer(_bits))

register_part(
    "lq8 | lq4 | lq2",
    r"lq([248])",
    "values",
    lambda m: {"bits": int(m[1])},
    lambda spec: f"lq{spec.bits}" if spec.bits in QUANTIZATION_BITS else "",
)
