"""Byte layout of a compressed message: the header, bounded reads, bit packing and the uint8 carrier.

The layout itself (fields, sizes) is documented in :mod:`fedml_progfed.comm.codecs`.
Stage modules write their own per-tensor bytes and read them back through a
:class:`ByteReader`, which turns every overrun into a :class:`MalformedPayloadError`
naming the tensor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from fedml_progfed.errors import InvalidUpdateError

MAGIC = b"PF"
FORMAT_VERSION = 1
# magic | version | value code | flags (bit 0: rotation, bits 1+: sparsifier code) | keep % | tensor count
_HEADER = struct.Struct("<2sBBBBH")
HEADER_NBYTES = _HEADER.size  # 8
MAX_TENSORS = 0xFFFF
# version 1 stored a value code rather than the bits themselves
_VALUE_CODE = {32: 0, 8: 1, 4: 2, 2: 3}

PayloadLike = Union[bytes, bytearray, memoryview, torch.Tensor]


class MalformedPayloadError(InvalidUpdateError, ValueError):
    """A compressed payload is truncated, has trailing bytes, or was written by another format or spec.

    Both an :class:`~fedml_progfed.errors.InvalidUpdateError` (the server rejects the
    update with a clear message) and a ``ValueError`` (a bad value for ``decode``).
    """


@dataclass(frozen=True)
class Header:
    """What a payload says about itself: the codes of its stages and its tensor count.

    Attributes
    ----------
    bits
        Bits per value of the value coding (32, 8, 4, 2).
    sparsifier
        Wire code of the sparsifier, 0 for none.
    transforms
        OR of the header flags of the active transforms (rotation: 1).
    keep_percent
        The sparsifier's keep share (100 without one).
    count
        Number of tensors.
    """

    bits: int
    sparsifier: int
    transforms: int
    keep_percent: int
    count: int

    def codes(self) -> tuple[int, int, int, int]:
        """Everything but the count: what must match the decoder's spec."""
        return self.bits, self.sparsifier, self.transforms, self.keep_percent


def pack_header(header: Header) -> bytes:
    """The header's bytes; more than :data:`MAX_TENSORS` tensors is a ``ValueError``."""
    if header.count > MAX_TENSORS:
        raise ValueError(f"a compressed message holds at most {MAX_TENSORS} tensors, got {header.count}")
    flags = header.transforms | header.sparsifier << 1
    return _HEADER.pack(MAGIC, FORMAT_VERSION, _VALUE_CODE[header.bits], flags, header.keep_percent, header.count)


class ByteReader:
    """Sequential reads from a payload; running past the end names the tensor and the offsets.

    ``context`` says what is being read (``"header"``, ``"tensor 'fc.weight'"``) and
    prefixes every error made with :meth:`error`.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0
        self.context = "header"

    def take(self, nbytes: int) -> memoryview:
        """The next ``nbytes`` bytes; :class:`MalformedPayloadError` when fewer are left."""
        end = self.offset + nbytes
        if end > len(self.data):
            raise MalformedPayloadError(
                f"truncated compressed payload: {self.context} needs {nbytes} bytes at offset {self.offset}, "
                f"but the payload has only {len(self.data)} bytes"
            )
        view = memoryview(self.data)[self.offset:end]
        self.offset = end
        return view

    def error(self, problem: str) -> MalformedPayloadError:
        """An error about what is being read: ``compressed payload: <context> <problem>``."""
        return MalformedPayloadError(f"compressed payload: {self.context} {problem}")

    def finish(self) -> None:
        """Refuse bytes after the last tensor."""
        if self.offset != len(self.data):
            raise MalformedPayloadError(
                f"compressed payload has {len(self.data) - self.offset} trailing bytes after the last tensor "
                f"(shapes or names differ between encoder and decoder?)"
            )


def read_header(reader: ByteReader) -> Header:
    """Read and check the header's magic and version; the caller compares its codes with the spec."""
    magic, version, value_code, flags, keep, count = _HEADER.unpack(reader.take(HEADER_NBYTES))
    if magic != MAGIC:
        raise MalformedPayloadError(f"not a fedml_progfed compressed payload: starts with {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise MalformedPayloadError(
            f"compressed payload has format version {version}; this decoder reads version {FORMAT_VERSION} "
            f"(server and clients must run the same fedml_progfed version)"
        )
    bits = {code: bits for bits, code in _VALUE_CODE.items()}.get(value_code, -1)
    return Header(bits, flags >> 1, flags & 1, keep, count)


# ----------------------------------------------------------------------------- bit packing


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack ``bits``-bit codes (uint8 < 2**bits) LSB-first: 2 per byte for 4-bit, 4 for 2-bit."""
    if bits == 8:
        return codes.astype(np.uint8).tobytes()
    per_byte = 8 // bits
    padded = np.zeros(-(-codes.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: codes.size] = codes
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per_byte) << shifts, axis=1).astype(np.uint8).tobytes()


def unpack_bits(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as uint8."""
    packed = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return packed[:count]
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return ((packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)[:count]


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of ``count`` packed ``bits``-bit codes: ceil(count * bits / 8)."""
    return -(-count * bits // 8)


# ----------------------------------------------------------------------------- the uint8 carrier


def payload_to_tensor(payload: bytes) -> torch.Tensor:
    """The payload as ONE 1-D ``uint8`` tensor, the form FedML can carry (numel == len(payload))."""
    return torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy())


def payload_from_tensor(tensor: torch.Tensor) -> bytes:
    """Inverse of :func:`payload_to_tensor`; rejects anything but a 1-D uint8 tensor."""
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise MalformedPayloadError(
            f"compressed payload must be a 1-D uint8 tensor, got dtype {tensor.dtype} with shape {tuple(tensor.shape)}"
        )
    return tensor.detach().cpu().numpy().tobytes()


def as_bytes(payload: PayloadLike) -> bytes:
    """Bytes of a payload given as bytes-like or as the uint8 tensor of :func:`payload_to_tensor`."""
    if isinstance(payload, torch.Tensor):
        return payload_from_tensor(payload)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    raise MalformedPayloadError(f"compressed payload must be bytes or a uint8 tensor, got {type(payload).__name__}")
