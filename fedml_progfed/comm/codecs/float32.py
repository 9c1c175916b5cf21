"""``float``: values as little-endian float32, exact (the default value coding)."""

from __future__ import annotations

import numpy as np
import torch

from fedml_progfed.comm.codecs.spec import register_part
from fedml_progfed.comm.codecs.stages import ValueCoding, register_value_coding
from fedml_progfed.comm.codecs.wire_format import ByteReader


class Float32(ValueCoding):
    """4 bytes per value, no scales; decode(encode(x)) == x for float32 input."""

    bits = 32

    def encode(self, values: torch.Tensor, name: str, rounding: torch.Generator) -> bytes:
        return values.numpy().astype("<f4", copy=False).tobytes()

    def decode(self, reader: ByteReader, count: int) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(reader.take(4 * count), dtype="<f4").astype(np.float32))


register_value_coding(Float32())
# float is the default (bits=32), so it never appears in the canonical text of a spec with other parts
register_part("float", r"float", "values", lambda m: {"bits": 32}, lambda spec: "")
