"""Wire codecs for model updates: quantization, sparsification, rotation, error feedback.

ProgFed (Sec. 4.4, Tables 5/11) combines progressive training with classical
message compression "following Konečný et al. (2016)": linear quantization with
X bits (LQ-X) and random sparsification keeping X % of the entries (SP-X), and
their combinations. This package turns a message's tensors into ONE byte string
(sent as one ``uint8`` tensor, see :func:`payload_to_tensor`, because FedML
needs every message value to be a tensor) and back, so that bytes are counted
from what is actually encoded, positions, scales and headers included.

Spec strings, parts joined by ``+`` in any order, at most one per slot:

``float``            float32 values, exact (the default).
``lq8 | lq4 | lq2``  linear quantization, stochastic rounding, per-tensor min/max
                     (Konečný et al. 2016, Sec. 3.2; Alistarh et al. 2017).
``rot``              randomized Hadamard rotation before quantizing, in blocks (Suresh et
                     al. 2017); needs an ``lq`` part.
``sp<1-99>``         random sparsification keeping that share, kept values
                     scaled by n/k so the estimate is unbiased (Konečný et al. 2016).
``topk<1-99>``       the k largest magnitudes, biased (Stich et al. 2018).
``ef``               error feedback (Stich et al. 2018; Karimireddy et al. 2019),
                     handled by :class:`ErrorFeedback`; wire-identical to the spec
                     without it.

Per tensor, sparsification runs first, then the rotation, then the value coding.

Wire format (version 2, little-endian). Both sides know the names, their order
and their shapes (the sub-model's), so the payload carries no names::

    message = header(13) + tensor_1 + ... + tensor_T
    header  = b"PF" | version u8 (2) | bits u8 (32, 8, 4, 2) | sparsifier code u8
              (0 none, 1 sp, 2 topk) | transform flags u8 (bit 0: rot) | keep % u8
              | T u16 | crc u32
    crc     = zlib.crc32 of the header's first 9 bytes followed by every tensor's bytes
    tensor  = [position tag u8 + positions]   only with sp/topk (:mod:`.sparsify`)
              [min f32 + max f32]             only with lq
              values: float32 (4 B each) or b-bit codes packed LSB-first

The decoder checks, in order: length, magic, version, CRC (a mismatch means
corrupted or truncated in transit), the spec codes and count against its own
spec, then each tensor through a bounded reader (positions strictly increasing
and in range; quantization scales finite, min <= max and within
``quantize.MAX_ABS_SCALE``), and finally that no bytes are left. The encoder
refuses NaN or infinite values in any tensor, under every spec, with a
``ValueError`` naming the tensor.

Exact sizes: 13 bytes per message, plus for a tensor of n values
(k = ceil(keep% * n / 100) kept):

- ``float``: 4n.  ``lq<b>``: 8 + ceil(n*b/8) (``lq8``: n + 8).
- ``rot`` adds nothing: it rotates in power-of-two blocks without padding
  (:mod:`.rotate`), so ``lq8+rot`` is exactly as long as ``lq8``.
- sparse: 1 + positions + (4k | 8 + ceil(k*b/8)) where positions is the
  smallest of: 0 (shared seed, ``sp`` only; or ``all`` when k == n),
  ceil(n/8) (bitmask), 2k (uint16 deltas, when every gap fits) and 4k
  (uint32 indices).

Layout: :mod:`.spec` (grammar), :mod:`.wire_format` (header, reader, packing),
:mod:`.stages` (stage interfaces and registries), one module per stage
(:mod:`.float32`, :mod:`.quantize`, :mod:`.sparsify`, :mod:`.topk`,
:mod:`.rotate`, :mod:`.error_feedback`), :mod:`.pipeline` (encode/decode) and
:mod:`.codec` (:class:`Codec`). A new codec is one module that subclasses a
stage, registers it and its spec part, plus its import line below.
"""

# Stage modules register their spec parts and stages on import; the order of the
# imports is the order of the parts in valid_forms() and of the transforms.
from fedml_progfed.comm.codecs import float32, quantize, rotate, sparsify, topk  # noqa: F401  (registration)
from fedml_progfed.comm.codecs.codec import Codec
from fedml_progfed.comm.codecs.error_feedback import ErrorFeedback
from fedml_progfed.comm.codecs.pipeline import decode, encode, payload_layouts
from fedml_progfed.comm.codecs.spec import CompressionSpec, SpecError, information_bits, parse_spec, valid_forms
from fedml_progfed.comm.codecs.wire_format import MalformedPayloadError, payload_from_tensor, payload_to_tensor

__all__ = [
    "Codec",
    "CompressionSpec",
    "ErrorFeedback",
    "SpecError",
    "MalformedPayloadError",
    "parse_spec",
    "valid_forms",
    "information_bits",
    "encode",
    "decode",
    "payload_layouts",
    "payload_to_tensor",
    "payload_from_tensor",
]
