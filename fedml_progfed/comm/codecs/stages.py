"""The three kinds of codec stage, their registries, and the per-tensor random streams.

A tensor travels through at most one sparsifier, then the active transforms,
then exactly one value coding (:mod:`fedml_progfed.comm.codecs.pipeline`). Each
kind is an abstract class with a registry; a stage module defines a subclass,
registers an instance here and registers its spec part(s) in
:mod:`~fedml_progfed.comm.codecs.spec`. The registries live in this small
module (not in the pipeline) so that stage modules depend on it and never on the
pipeline, which imports them all through the package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from fedml_progfed.comm.codecs.spec import CompressionSpec
from fedml_progfed.comm.codecs.wire_format import ByteReader
from fedml_progfed.core.registry import Registry
from fedml_progfed.core.seeding import derive_seed


def tensor_generator(seed: int, name: str, purpose: str) -> torch.Generator:
    """An independent random stream per message seed, tensor and purpose.

    Separate streams let the decoder redraw positions or signs without replaying the
    encoder's rounding noise.
    """
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, name, purpose))
    return g


# ----------------------------------------------------------------------------- value codings


class ValueCoding(ABC):
    """How the values that reach the wire are written: float32, or b-bit codes plus scales.

    Registered by :attr:`bits`, which is :attr:`CompressionSpec.bits` and is stored in the header.
    """

    bits: int

    @abstractmethod
    def encode(self, values: torch.Tensor, name: str, rounding: torch.Generator) -> bytes:
        """Bytes of the float32 vector ``values`` of tensor ``name``; ``rounding`` seeds any randomness."""

    @abstractmethod
    def decode(self, reader: ByteReader, count: int) -> torch.Tensor:
        """Read ``count`` values back as a float32 vector."""


VALUE_CODINGS: Registry[ValueCoding] = Registry("value coding (bits per value)")


def register_value_coding(coding: ValueCoding) -> ValueCoding:
    """Make ``coding`` the one for ``CompressionSpec(bits=coding.bits)``."""
    return VALUE_CODINGS.add(str(coding.bits), coding)


def value_coding(spec: CompressionSpec) -> ValueCoding:
    """The value coding of ``spec``."""
    return VALUE_CODINGS[str(spec.bits)]


# ----------------------------------------------------------------------------- sparsifiers


class Sparsifier(ABC):
    """Chooses which ``k`` of a tensor's ``n`` entries are sent.

    Attributes
    ----------
    name
        Its value of :attr:`CompressionSpec.sparsifier` and its registry name.
    code
        Its code in the payload header (1..255; 0 means no sparsifier).
    positions_from_seed
        True when the positions depend on the seed only (:meth:`redraw` repeats them), so
        they need not travel (the ``seed`` layout).
    """

    name: str
    code: int
    positions_from_seed: bool = False

    @abstractmethod
    def select(self, x: torch.Tensor, k: int, positions: torch.Generator) -> torch.Tensor:
        """``k`` sorted int64 positions of the flat tensor ``x`` (``0 < k < n``)."""

    def scale(self, n: int, k: int) -> float:
        """Factor applied to the kept values (``n / k`` makes uniform sampling unbiased)."""
        return 1.0

    def redraw(self, n: int, k: int, positions: torch.Generator) -> torch.Tensor:
        """The positions :meth:`select` picks, from the seed alone (only when :attr:`positions_from_seed`)."""
        raise NotImplementedError(f"sparsifier {self.name!r} picks positions from the values; they must travel")


SPARSIFIERS: Registry[Sparsifier] = Registry("sparsifier")


def register_sparsifier(sparsifier: Sparsifier) -> Sparsifier:
    """Add a sparsifier; its header code must be unused (caught at import)."""
    taken = {s.code: s.name for _, s in SPARSIFIERS.items()}
    if not 0 < sparsifier.code < 256 or sparsifier.code in taken:
        raise ValueError(f"sparsifier {sparsifier.name!r}: header code {sparsifier.code} is invalid or taken ({taken})")
    return SPARSIFIERS.add(sparsifier.name, sparsifier)


def sparsifier_by_code(code: int) -> Sparsifier | None:
    """The sparsifier with header code ``code``, or ``None``."""
    return next((s for _, s in SPARSIFIERS.items() if s.code == code), None)


# ----------------------------------------------------------------------------- transforms


class Transform(ABC):
    """An invertible, length-preserving map applied to the kept values before the value coding (a rotation).

    Length-preserving, so a transform never changes the byte count: what it buys must
    come from making the value coding more accurate.

    Attributes
    ----------
    field
        The boolean :class:`CompressionSpec` field that switches it on (``"rotate"``).
    flag
        Its bit in the header's transform flags.
    purpose
        Name of its random stream (see :func:`tensor_generator`).
    """

    field: str
    flag: int
    purpose: str

    @abstractmethod
    def forward(self, values: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The transformed float32 vector."""

    @abstractmethod
    def inverse(self, values: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Undo :meth:`forward` given a generator with the same seed."""


TRANSFORMS: Registry[Transform] = Registry("transform")


def register_transform(transform: Transform) -> Transform:
    """Add a transform (applied in registration order, undone in reverse); its flag bit must be unused."""
    taken = 0
    for _, t in TRANSFORMS.items():
        taken |= t.flag
    if transform.flag not in (1, 2, 4, 8, 16, 32, 64, 128) or transform.flag & taken:
        raise ValueError(f"transform {transform.field!r}: header flag {transform.flag} is not a free single bit")
    return TRANSFORMS.add(transform.field, transform)


def active_transforms(spec: CompressionSpec) -> list[Transform]:
    """The transforms ``spec`` switches on, in application order."""
    return [t for _, t in TRANSFORMS.items() if getattr(spec, t.field)]
