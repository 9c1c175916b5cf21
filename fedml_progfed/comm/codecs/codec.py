"""``Codec``: a parsed spec with its encode/decode, and the sender's error-feedback memory when ``+ef``."""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence

import torch

from fedml_progfed.comm.codecs.error_feedback import ErrorFeedback
from fedml_progfed.comm.codecs.pipeline import decode, encode
from fedml_progfed.comm.codecs.spec import CompressionSpec, as_spec, information_bits
from fedml_progfed.comm.codecs.wire_format import PayloadLike


class Codec:
    """A parsed compression spec: ``Codec("lq8+sp25")``.

    Stateless: with ``+ef`` the caller passes the sender's :class:`ErrorFeedback` memory
    (one per client), so a trainer object that simulates many clients cannot mix residuals.

    Parameters
    ----------
    spec
        The spec string (or an already parsed :class:`CompressionSpec`).

    Raises
    ------
    SpecError
        For a bad spec string; the caller adds where the string came from.
    """

    def __init__(self, spec: str | CompressionSpec) -> None:
        self.spec = as_spec(spec)

    @property
    def error_feedback(self) -> bool:
        """True when the spec has ``+ef``: :meth:`encode` then needs a memory."""
        return self.spec.error_feedback

    def new_memory(self) -> ErrorFeedback:
        """A fresh error-feedback memory for one sender."""
        return ErrorFeedback()

    def encode(
        self, tensors: Mapping[str, torch.Tensor], names: Sequence[str], seed: int, memory: ErrorFeedback | None = None
    ) -> bytes:
        """Encode with this spec (see :func:`~fedml_progfed.comm.codecs.encode`).

        ``memory`` is required with ``+ef`` and refused without it, so a missing memory
        cannot silently turn error feedback off.
        """
        if self.error_feedback != (memory is not None):
            problem = (
                "'ef' needs the sender's ErrorFeedback memory"
                if self.error_feedback
                else "an ErrorFeedback memory was given but the spec has no 'ef'"
            )
            raise ValueError(f"compression {self.spec.text!r}: {problem}")
        if memory is not None:
            return memory.compress(tensors, names, self.spec, seed)
        return encode(tensors, names, self.spec, seed)

    def decode(
        self, payload: PayloadLike, shapes: Mapping[str, Sequence[int]], names: Sequence[str], seed: int
    ) -> "OrderedDict[str, torch.Tensor]":
        """Decode with this spec (see :func:`~fedml_progfed.comm.codecs.decode`)."""
        return decode(payload, shapes, names, self.spec, seed)

    def information_bits(self, n_values: int) -> int:
        """See :func:`~fedml_progfed.comm.codecs.information_bits`."""
        return information_bits(self.spec, n_values)

    def __repr__(self) -> str:
        return f"Codec({self.spec.text!r})"
