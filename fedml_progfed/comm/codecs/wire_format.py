"""Byte layout of a compressed message: the header, bounded reads, bit packing and the uint8 carrier.

The layout itself (fields, sizes) is documented in :mod:`fedml_progfed.comm.codecs`.
Stage modules write their own per-tensor bytes and read them back through a
:class:`ByteReader`, which turns every overrun into a :class:`MalformedPayloadError`
naming the tensor.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from fedml_progfed.errors import InvalidUpdateError

MAGIC = b"PF"
FORMAT_VERSION = 2
# magic | version | bits | sparsifier code | transform flags | keep % | tensor count, then the CRC
_PREFIX = struct.Struct("<2sBBBBBH")
_CRC = struct.Struct("<I")
HEADER_NBYTES = _PREFIX.size + _CRC.size  # 13
MAX_TENSORS = 0xFFFF

PayloadLike = Union[bytes, bytearray, memoryview, torch.Tensor]


class MalformedPayloadError(InvalidUpdateError, ValueError):
    """A compressed payload fails its CRC, is truncated, has trailing bytes or invalid positions or scales,
    or was written by another format version or spec.

    Both an :class:`~fedml_progfed.errors.InvalidUpdateError` (the server rejects the
    update with a clear message) and a ``ValueError`` (a bad value for ``decode``).
    """


@dataclass(frozen=True)
class Header:
    """What a payload says about itself: the codes of its stages and its tensor count.

    Attributes
    ----------
    bits
        Bits per value of the value coding (32, 8, 4, 2), stored as they are.
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


def _crc(prefix: bytes | memoryview, body: bytes | memoryview) -> int:
    # the header's fields are covered too, so a flipped spec code or count reads as corruption
    return zlib.crc32(body, zlib.crc32(prefix))


def seal(header: Header, body: bytes) -> bytes:
    """The payload: header (with the CRC32 of its fields and ``body``) followed by ``body``.

    More than :data:`MAX_TENSORS` tensors is a ``ValueError``.
    """
    if header.count > MAX_TENSORS:
        raise ValueError(f"a compressed message holds at most {MAX_TENSORS} tensors, got {header.count}")
    prefix = _PREFIX.pack(
        MAGIC, FORMAT_VERSION, header.bits, header.sparsifier, header.transforms, header.keep_percent, header.count
    )
    return prefix + _CRC.pack(_crc(prefix, body)) + body


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


def read_header(reader: ByteReader) -> tuple[Header, int]:
    """Read the header and check its magic and version: (header, stored CRC).

    The caller compares the header's codes with its spec; :func:`open_payload` also checks the CRC.
    """
    magic, version, bits, sparsifier, transforms, keep, count = _PREFIX.unpack(reader.take(_PREFIX.size))
    if magic != MAGIC:
        raise MalformedPayloadError(f"not a fedml_progfed compressed payload: starts with {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise MalformedPayloadError(
            f"compressed payload has format version {version}; this decoder reads version {FORMAT_VERSION} "
            f"(server and clients must run the same fedml_progfed version)"
        )
    (stored,) = _CRC.unpack(reader.take(_CRC.size))
    return Header(bits, sparsifier, transforms, keep, count), stored


def open_payload(data: bytes) -> tuple[Header, ByteReader]:
    """Check a payload's header and CRC; return the header and a reader at the first tensor.

    Raises
    ------
    MalformedPayloadError
        For a payload shorter than a header, another magic or version, or a CRC mismatch
        (checked before anything else is trusted, so damage in transit reads as such).
    """
    reader = ByteReader(data)
    header, stored = read_header(reader)
    view = memoryview(data)
    actual = _crc(view[: _PREFIX.size], view[HEADER_NBYTES:])
    if actual != stored:
        raise MalformedPayloadError(
            f"compressed payload fails its CRC: corrupted or truncated in transit "
            f"({len(data)} bytes, CRC stored {stored:#010x}, computed {actual:#010x})"
        )
    return header, reader


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
