"""Wire codec for compressed updates: linear quantization, sparsification, rotation, error feedback.

ProgFed (Sec. 4.4, Tables 5/11) combines progressive training with classical
message compression "following Konečný et al. (2016)": linear quantization with
X bits (LQ-X) and random sparsification keeping X % of the entries (SP-X), and
their combinations. This module turns a message's tensors into ONE byte string
(sent as one ``uint8`` tensor, see :func:`payload_to_tensor`, because FedML
needs every message value to be a tensor) and back, so that bytes are counted
from what is actually encoded, indices, scales and headers included
(DESIGN.md).

Spec strings (``progfed_args.progfed_compression_up`` / ``_down``), parts joined
by ``+`` in any order:

``float``            float32 values, exact.
``lq8 | lq4 | lq2``  linear quantization, stochastic rounding, per-tensor min/max
                     (Konečný et al. 2016, Sec. 3.2; Alistarh et al. 2017).
``rot``              randomized Hadamard rotation before quantizing (Suresh et
                     al. 2017); needs an ``lq`` part.
``sp<1-99>``         random sparsification keeping that share, kept values
                     scaled by n/k so the estimate is unbiased (Konečný et al. 2016).
``topk<1-99>``       the k largest magnitudes, biased (Stich et al. 2018).
``ef``               error feedback (Stich et al. 2018; Karimireddy et al. 2019),
                     handled by :class:`ErrorFeedback`; wire-identical to the spec
                     without it.

Sparsification runs first, then quantization of the kept values.

Wire format (version 1, little-endian). Both sides know the names, their order
and their shapes (the sub-model's), so the payload carries no names::

    message = header(8) + tensor_1 + ... + tensor_T
    header  = b"PF" | version u8 | value code u8 | flags u8 | keep % u8 | T u16
    tensor  = [position tag u8 + positions]   only with sp/topk
              [min f32 + max f32]             only with lq
              values: float32 (4 B each) or b-bit codes packed LSB-first

Exact sizes for a tensor of n values (k = ceil(keep% * n / 100) kept; with
``rot`` the quantized vector is padded to m = next power of two >= k):

- ``float``: 4n.  ``lq<b>``: 8 + ceil(n*b/8) (``lq8``: n + 8).
- sparse: 1 + positions + (4k | 8 + ceil(k*b/8)) where positions is the
  smallest of: 0 (shared seed, ``sp`` only; or ``all`` when k == n),
  ceil(n/8) (bitmask), 2k (uint16 deltas, when every gap fits) and 4k
  (uint32 indices).
"""

from __future__ import annotations

import math
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import numpy as np
import torch

from fedml_progfed.core.seeding import derive_seed
from fedml_progfed.errors import ConfigError, InvalidUpdateError

FORMAT_VERSION = 1
MAGIC = b"PF"
_HEADER = struct.Struct("<2sBBBBH")
HEADER_NBYTES = _HEADER.size  # 8
_SCALE = struct.Struct("<ff")
SCALE_NBYTES = _SCALE.size  # 8: min and max as float32
TAG_NBYTES = 1

# Position layouts of a sparsified tensor, recorded in its 1-byte tag.
POS_SEED, POS_MASK, POS_DELTA16, POS_INDEX32, POS_ALL = 0, 1, 2, 3, 4
POSITION_LAYOUTS = {POS_SEED: "seed", POS_MASK: "mask", POS_DELTA16: "delta16", POS_INDEX32: "index32", POS_ALL: "all"}

PayloadLike = Union[bytes, bytearray, memoryview, torch.Tensor]


class MalformedPayloadError(InvalidUpdateError, ValueError):
    """A compressed payload is truncated, has trailing bytes, or was written by another format or spec.

    Both an :class:`~fedml_progfed.errors.InvalidUpdateError` (the server rejects the
    update with a clear message) and a ``ValueError`` (a bad value for ``decode``).
    """


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class CompressionSpec:
    """A parsed compression spec (see the module docstring for the string forms).

    Attributes
    ----------
    bits
        Bits per transmitted value: 32 for float32, else 8, 4 or 2 (linear quantization).
    rotate
        Randomized Hadamard rotation before quantizing (Suresh et al. 2017).
    sparsifier
        ``None``, ``"random"`` (unbiased, Konečný et al. 2016) or ``"topk"`` (biased).
    keep_percent
        Share of entries kept by the sparsifier, 1..99 (100 without one).
    error_feedback
        Compress ``update + residual`` and keep the new residual (:class:`ErrorFeedback`).
    """

    bits: int = 32
    rotate: bool = False
    sparsifier: str | None = None
    keep_percent: int = 100
    error_feedback: bool = False

    @property
    def quantized(self) -> bool:
        """True for ``lq*`` specs."""
        return self.bits != 32

    @property
    def lossless(self) -> bool:
        """True when decode(encode(x)) == x exactly for float32 input."""
        return not self.quantized and self.sparsifier is None

    @property
    def text(self) -> str:
        """Canonical spec string, e.g. ``lq8+rot+sp25+ef``."""
        parts = [f"lq{self.bits}"] if self.quantized else []
        parts += ["rot"] if self.rotate else []
        parts += [f"{_SPARSIFIER_PREFIX[self.sparsifier]}{self.keep_percent}"] if self.sparsifier else []
        parts += ["ef"] if self.error_feedback else []
        return "+".join(parts) or "float"

    def kept(self, n_values: int) -> int:
        """Entries a tensor of ``n_values`` keeps: ceil(keep% * n / 100), at least one when n > 0."""
        # integer arithmetic: 0.1 * 1000 is 100.00000000000001 in floating point
        return (self.keep_percent * n_values + 99) // 100

    def __str__(self) -> str:
        return self.text


_SPARSIFIER_PREFIX = {"random": "sp", "topk": "topk"}


@dataclass(frozen=True)
class _Part:
    """One ``+``-separated part of a spec string: its pattern, the slot it fills and its fields."""

    pattern: re.Pattern
    slot: str
    form: str
    fields: Callable[[re.Match], dict]


_PARTS: list[_Part] = []


def _register_part(pattern: str, slot: str, form: str, fields: Callable[[re.Match], dict]) -> None:
    """Add a spec part; a form registered twice is a programming error, caught at import."""
    if any(p.form == form for p in _PARTS):
        raise RuntimeError(f"compression spec part {form!r} registered twice")
    _PARTS.append(_Part(re.compile(pattern), slot, form, fields))


_register_part(r"float", "values", "float", lambda m: {"bits": 32})
_register_part(r"lq([248])", "values", "lq8 | lq4 | lq2", lambda m: {"bits": int(m[1])})
_register_part(r"rot", "rotation", "rot", lambda m: {"rotate": True})
_register_part(r"sp([1-9][0-9]?)", "sparsifier", "sp<1-99>", lambda m: {"sparsifier": "random", "keep_percent": int(m[1])})
_register_part(r"topk([1-9][0-9]?)", "sparsifier", "topk<1-99>", lambda m: {"sparsifier": "topk", "keep_percent": int(m[1])})
_register_part(r"ef", "memory", "ef", lambda m: {"error_feedback": True})

# Combinations that parse but mean nothing: (predicate, reason).
_RULES: tuple[tuple[Callable[[CompressionSpec], bool], str], ...] = (
    (lambda s: s.rotate and not s.quantized, "'rot' rotates values before quantizing, so it needs lq8, lq4 or lq2"),
    (lambda s: s.error_feedback and s.lossless, "'ef' needs a lossy part (lq*, sp*, topk*); float is already exact"),
)


def valid_forms() -> str:
    """The accepted spec forms, for error messages and docs."""
    forms = ", ".join(p.form for p in _PARTS)
    return f"parts {forms} joined by '+' (at most one of each kind), e.g. float, lq8, lq4+topk10, lq8+sp25+ef, lq8+rot"


def parse_spec(text: str, key: str) -> CompressionSpec:
    """Parse a spec string such as ``lq8+sp25`` into a :class:`CompressionSpec`.

    Parameters
    ----------
    text
        The configured value; case and surrounding spaces are ignored.
    key
        The configuration key it came from (e.g. ``progfed_args.progfed_compression_up``),
        named in every error.

    Raises
    ------
    ConfigError
        For an unknown part, two parts of the same kind, or a meaningless combination.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{key}: expected a compression spec string, got {text!r}; valid: {valid_forms()}")
    fields: dict = {}
    slots: dict[str, str] = {}
    for token in (t.strip() for t in text.strip().lower().split("+")):
        found = [(p, m) for p in _PARTS if (m := p.pattern.fullmatch(token))]
        if not found:
            raise ConfigError(f"{key}: unknown compression part {token!r} in {text!r}; valid: {valid_forms()}")
        part, match = found[0]
        if part.slot in slots:
            raise ConfigError(f"{key}: {text!r} has two {part.slot} parts ({slots[part.slot]!r} and {token!r}); valid: {valid_forms()}")
        slots[part.slot] = token
        fields.update(part.fields(match))
    spec = CompressionSpec(**fields)
    for broken, reason in _RULES:
        if broken(spec):
            raise ConfigError(f"{key}: {text!r}: {reason}; valid: {valid_forms()}")
    return spec


def _as_spec(spec: CompressionSpec | str) -> CompressionSpec:
    return spec if isinstance(spec, CompressionSpec) else parse_spec(spec, "compression spec")


def information_bits(spec: CompressionSpec | str, n_values: int) -> int:
    """Information-theoretic payload of ``n_values`` under ``spec``: bits per value times values sent.

    With sparsification only the kept values count (positions are overhead), and
    rotation padding is overhead too, so ``encoded bytes * 8 / information_bits`` is
    the wire efficiency (1.0 is ideal; ProgFed Table 5 reports these ratios as
    25 % for LQ-8, 6.25 % for LQ-8+SP-25, ...).
    """
    spec = _as_spec(spec)
    return spec.bits * spec.kept(n_values)


# ----------------------------------------------------------------------------- primitives


def _generator(seed: int, name: str, purpose: str) -> torch.Generator:
    """An independent stream per tensor and purpose, so the decoder can redraw positions or
    signs without replaying the encoder's rounding noise."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, name, purpose))
    return g


def _next_pow2(k: int) -> int:
    return 1 << (k - 1).bit_length() if k > 0 else 0


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform of a power-of-two-length vector (its own inverse)."""
    m = x.numel()
    y = x
    h = 1
    while h < m:
        pairs = y.view(-1, 2, h)
        y = torch.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), dim=1).reshape(m)
        h *= 2
    return y / math.sqrt(m) if m else y


def _signs(m: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (m,), generator=g, dtype=torch.int8).to(torch.float32) * 2 - 1


def rotate(values: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Randomized Hadamard rotation H·D·pad(v) (Suresh et al. 2017): spreads outliers over all
    coordinates so min/max quantization wastes fewer levels. Output length: next power of two."""
    k = values.numel()
    padded = torch.zeros(_next_pow2(k), dtype=torch.float32)
    padded[:k] = values
    return _fwht(padded * _signs(padded.numel(), g))


def unrotate(rotated: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Inverse of :func:`rotate` (D·H is the inverse of H·D), cut back to ``k`` values."""
    return (_fwht(rotated) * _signs(rotated.numel(), g))[:k]


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


def _packed_nbytes(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def _quantize(values: torch.Tensor, bits: int, g: torch.Generator) -> bytes:
    """min/max linear quantization with stochastic rounding (Konečný et al. 2016, Sec. 3.2).

    min/max rather than a single absmax: 2**b levels span the actual range (absmax
    spends one code on symmetry and wastes the empty side of a skewed range, which hurts
    most at 2 bits), and a constant tensor is exact. Costs 4 more bytes per tensor.
    """
    n = values.numel()
    lo, hi = (float(values.min()), float(values.max())) if n else (0.0, 0.0)
    levels = (1 << bits) - 1
    if hi > lo:
        # float64: (hi - lo) may be tiny or overflow float32; E[code] = u keeps it unbiased
        u = (values.double() - lo) * (levels / (hi - lo))
        codes = torch.floor(u + torch.rand(n, generator=g, dtype=torch.float64)).clamp_(0, levels).to(torch.uint8)
    else:
        codes = torch.zeros(n, dtype=torch.uint8)
    return _SCALE.pack(lo, hi) + pack_bits(codes.numpy(), bits)


def _dequantize(lo: float, hi: float, codes: np.ndarray, bits: int) -> torch.Tensor:
    step = (hi - lo) / ((1 << bits) - 1)
    return (torch.from_numpy(codes.astype(np.float64)) * step + lo).to(torch.float32)


def _random_positions(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """k of n positions uniformly without replacement, sorted; the decoder redraws them from the seed."""
    return torch.randperm(n, generator=g)[:k].sort().values


def _select_random(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    return _random_positions(x.numel(), k, g)


def _select_topk(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.topk(x.abs(), k, sorted=False).indices.sort().values


# sparsifier -> (select positions, scale of kept values given n and k)
_SPARSIFIERS: dict[str, tuple[Callable[[torch.Tensor, int, torch.Generator], torch.Tensor], Callable[[int, int], float]]] = {
    "random": (_select_random, lambda n, k: n / k),  # inclusion probability k/n -> unbiased
    "topk": (_select_topk, lambda n, k: 1.0),
}


def _position_candidates(idx: np.ndarray, n: int, k: int, random: bool) -> list[tuple[int, int]]:
    """(bytes, tag) for every layout that can carry these positions."""
    if k == n:
        return [(0, POS_ALL)]
    out = [(0, POS_SEED)] if random else []
    out.append((-(-n // 8), POS_MASK))
    if int(np.diff(idx, prepend=0).max()) <= 0xFFFF:  # k >= 1 here: k == 0 only when n == 0
        out.append((2 * k, POS_DELTA16))
    if n <= 1 << 32:
        out.append((4 * k, POS_INDEX32))
    return out


def _write_mask(idx: np.ndarray, n: int) -> bytes:
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return np.packbits(mask, bitorder="little").tobytes()


# tag -> writer of the kept positions (sorted int64); seed and all put nothing on the wire
_POSITION_WRITERS: dict[int, Callable[[np.ndarray, int], bytes]] = {
    POS_ALL: lambda idx, n: b"",
    POS_SEED: lambda idx, n: b"",
    POS_MASK: _write_mask,
    POS_DELTA16: lambda idx, n: np.diff(idx, prepend=0).astype("<u2").tobytes(),
    POS_INDEX32: lambda idx, n: idx.astype("<u4").tobytes(),
}


# ----------------------------------------------------------------------------- payload reading


class _Reader:
    """Sequential reads from a payload; running past the end names the tensor and offsets."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0
        self.context = "header"

    def take(self, nbytes: int) -> memoryview:
        end = self.offset + nbytes
        if end > len(self.data):
            raise MalformedPayloadError(
                f"truncated compressed payload: {self.context} needs {nbytes} bytes at offset {self.offset}, "
                f"but the payload has only {len(self.data)} bytes"
            )
        view = memoryview(self.data)[self.offset:end]
        self.offset = end
        return view


def _read_all(r: _Reader, n: int, k: int, name: str, seed: int) -> None:
    return None  # every entry kept: values are dense


def _read_seed(r: _Reader, n: int, k: int, name: str, seed: int) -> torch.Tensor:
    # the encoder's draw, repeated: same derived seed, same generator call
    return _random_positions(n, k, _generator(seed, name, "positions"))


def _read_mask(r: _Reader, n: int, k: int, name: str, seed: int) -> torch.Tensor:
    bits = np.unpackbits(np.frombuffer(r.take(-(-n // 8)), dtype=np.uint8), count=n, bitorder="little")
    idx = np.flatnonzero(bits)
    if idx.size != k:
        raise MalformedPayloadError(f"compressed payload: tensor {name!r} position mask has {idx.size} bits set, expected {k}")
    return torch.from_numpy(idx)


def _checked_indices(idx: np.ndarray, n: int, name: str, layout: str) -> torch.Tensor:
    if idx.size and (idx[-1] >= n or idx[0] < 0 or np.any(np.diff(idx) <= 0)):
        raise MalformedPayloadError(
            f"compressed payload: tensor {name!r} {layout} positions are not strictly increasing below {n}"
        )
    return torch.from_numpy(idx)


def _read_delta16(r: _Reader, n: int, k: int, name: str, seed: int) -> torch.Tensor:
    deltas = np.frombuffer(r.take(2 * k), dtype="<u2").astype(np.int64)
    return _checked_indices(np.cumsum(deltas), n, name, "delta16")


def _read_index32(r: _Reader, n: int, k: int, name: str, seed: int) -> torch.Tensor:
    return _checked_indices(np.frombuffer(r.take(4 * k), dtype="<u4").astype(np.int64), n, name, "index32")


# tag -> reader returning the kept positions (None: all of them)
_POSITION_READERS: dict[int, Callable[[_Reader, int, int, str, int], torch.Tensor | None]] = {
    POS_ALL: _read_all,
    POS_SEED: _read_seed,
    POS_MASK: _read_mask,
    POS_DELTA16: _read_delta16,
    POS_INDEX32: _read_index32,
}


def _valid_tags(n: int, k: int, random: bool) -> set[int]:
    if k == n:
        return {POS_ALL}
    return {POS_MASK, POS_DELTA16, POS_INDEX32} | ({POS_SEED} if random else set())


def _as_bytes(payload: PayloadLike) -> bytes:
    if isinstance(payload, torch.Tensor):
        return payload_from_tensor(payload)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    raise MalformedPayloadError(f"compressed payload must be bytes or a uint8 tensor, got {type(payload).__name__}")


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


# ----------------------------------------------------------------------------- encode / decode


def _header(spec: CompressionSpec, count: int) -> bytes:
    if count > 0xFFFF:
        raise ValueError(f"a compressed message holds at most 65535 tensors, got {count}")
    flags = int(spec.rotate) | _SPARSIFIER_CODE[spec.sparsifier] << 1
    return _HEADER.pack(MAGIC, FORMAT_VERSION, _BITS_CODE[spec.bits], flags, spec.keep_percent, count)


_BITS_CODE = {32: 0, 8: 1, 4: 2, 2: 3}
_SPARSIFIER_CODE = {None: 0, "random": 1, "topk": 2}


def _spec_from_header(bits_code: int, flags: int, keep: int) -> str:
    """Readable spec of a header, for mismatch messages."""
    bits = {v: k for k, v in _BITS_CODE.items()}.get(bits_code)
    sparsifier = {v: k for k, v in _SPARSIFIER_CODE.items()}.get(flags >> 1, "?")
    if bits is None or sparsifier == "?":
        return f"<unknown spec codes {bits_code}/{flags}/{keep}>"
    return CompressionSpec(bits, bool(flags & 1), sparsifier, keep).text


def _flat_float32(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"cannot encode: tensor {name!r} is listed in names but missing from the tensors")
    return tensors[name].detach().to("cpu", torch.float32).reshape(-1)


def encode(tensors: Mapping[str, torch.Tensor], names: Sequence[str], spec: CompressionSpec | str, seed: int) -> bytes:
    """Encode ``tensors[name]`` for ``name in names`` into one payload (see module docstring).

    Parameters
    ----------
    tensors
        Float tensors by name (any float dtype or device; encoded as float32).
    names
        Which tensors, in which order; the decoder must be given the same list.
    spec
        A :class:`CompressionSpec` or spec string; ``ef`` is ignored here (see :class:`ErrorFeedback`).
    seed
        Seeds stochastic rounding, random positions and rotation signs (derived per tensor
        from ``seed`` and the name). The caller derives it from run, round and client, and
        the decoder must use the same one.

    Returns
    -------
    bytes
        The payload; send it as :func:`payload_to_tensor`.

    Notes
    -----
    Quantization and random sparsification are unbiased (Konečný et al. 2016): the mean
    of decode(encode(x)) over seeds is x. Top-k is not (Stich et al. 2018).
    """
    spec = _as_spec(spec)
    chunks = [_header(spec, len(names))]
    for name in names:
        x = _flat_float32(tensors, name)
        n = x.numel()
        values = x
        if spec.sparsifier is not None:
            k = spec.kept(n)
            select, scale = _SPARSIFIERS[spec.sparsifier]
            idx = torch.arange(n) if k == n else select(x, k, _generator(seed, name, "positions"))
            idx_np = idx.numpy()
            _, tag = min(_position_candidates(idx_np, n, k, spec.sparsifier == "random"))
            chunks += [bytes([tag]), _POSITION_WRITERS[tag](idx_np, n)]
            values = x[idx] * scale(n, k)
        if spec.quantized:
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"cannot quantize tensor {name!r}: it holds NaN or infinite values")
            if spec.rotate:
                values = rotate(values, _generator(seed, name, "signs"))
            chunks.append(_quantize(values, spec.bits, _generator(seed, name, "rounding")))
        else:
            chunks.append(values.numpy().astype("<f4", copy=False).tobytes())
    return b"".join(chunks)


def _read_header(r: _Reader, spec: CompressionSpec, count: int) -> None:
    magic, version, bits_code, flags, keep, stored_count = _HEADER.unpack(r.take(HEADER_NBYTES))
    if magic != MAGIC:
        raise MalformedPayloadError(f"not a fedml_progfed compressed payload: starts with {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise MalformedPayloadError(
            f"compressed payload has format version {version}; this decoder reads version {FORMAT_VERSION} "
            f"(server and clients must run the same fedml_progfed version)"
        )
    expected = _header(spec, count)
    if _HEADER.unpack(expected)[2:5] != (bits_code, flags, keep):
        raise MalformedPayloadError(
            f"compressed payload was encoded as {_spec_from_header(bits_code, flags, keep)!r} but the decoder "
            f"expects {spec.text!r} (check progfed_compression_up/_down on both sides)"
        )
    if stored_count != count:
        raise MalformedPayloadError(f"compressed payload holds {stored_count} tensors, the decoder expects {count}")


def _decode_into(
    data: bytes,
    shapes: Mapping[str, Sequence[int]],
    names: Sequence[str],
    spec: CompressionSpec,
    seed: int,
    layouts: dict[str, str],
) -> "OrderedDict[str, torch.Tensor]":
    r = _Reader(data)
    _read_header(r, spec, len(names))
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name in names:
        if name not in shapes:
            raise ValueError(f"cannot decode: tensor {name!r} is listed in names but has no shape")
        shape = tuple(int(s) for s in shapes[name])
        n = math.prod(shape)
        r.context = f"tensor {name!r}"
        k, idx = n, None
        layouts[name] = "dense"
        if spec.sparsifier is not None:
            k = spec.kept(n)
            tag = r.take(TAG_NBYTES)[0]
            layouts[name] = POSITION_LAYOUTS.get(tag, f"unknown tag {tag}")
            if tag not in _valid_tags(n, k, spec.sparsifier == "random"):
                raise MalformedPayloadError(
                    f"compressed payload: tensor {name!r} has position layout {layouts[name]!r}, which is not valid "
                    f"for {spec.text!r} with {k} of {n} values kept"
                )
            idx = _POSITION_READERS[tag](r, n, k, name, seed)
        if spec.quantized:
            lo, hi = _SCALE.unpack(r.take(SCALE_NBYTES))
            m = _next_pow2(k) if spec.rotate else k
            values = _dequantize(lo, hi, unpack_bits(r.take(_packed_nbytes(m, spec.bits)), spec.bits, m), spec.bits)
            if spec.rotate:
                values = unrotate(values, k, _generator(seed, name, "signs"))
        else:
            values = torch.from_numpy(np.frombuffer(r.take(4 * k), dtype="<f4").astype(np.float32))
        if idx is None:
            flat = values
        else:
            flat = torch.zeros(n, dtype=torch.float32)
            flat[idx] = values
        out[name] = flat.reshape(shape)
    if r.offset != len(data):
        raise MalformedPayloadError(
            f"compressed payload has {len(data) - r.offset} trailing bytes after the last tensor "
            f"(shapes or names differ between encoder and decoder?)"
        )
    return out


def decode(
    payload: PayloadLike,
    shapes: Mapping[str, Sequence[int]],
    names: Sequence[str],
    spec: CompressionSpec | str,
    seed: int,
) -> "OrderedDict[str, torch.Tensor]":
    """Decode a payload from :func:`encode` into float32 tensors, in ``names`` order.

    Parameters
    ----------
    payload
        Bytes, or the 1-D uint8 tensor from :func:`payload_to_tensor`.
    shapes
        Shape of every named tensor (the sub-model's; nothing about shapes is sent).
    names, spec, seed
        Exactly as given to :func:`encode`; shared-seed positions and rotation signs are
        redrawn from ``seed``.

    Raises
    ------
    MalformedPayloadError
        (an ``InvalidUpdateError`` and a ``ValueError``) for a truncated payload, trailing
        bytes, another magic, format version, spec or tensor count, or invalid positions.
    """
    return _decode_into(_as_bytes(payload), shapes, names, _as_spec(spec), seed, {})


def payload_layouts(
    payload: PayloadLike, shapes: Mapping[str, Sequence[int]], names: Sequence[str], spec: CompressionSpec | str, seed: int
) -> "OrderedDict[str, str]":
    """How each tensor's positions travelled: ``dense``, ``all``, ``seed``, ``mask``, ``delta16`` or ``index32``."""
    layouts: OrderedDict[str, str] = OrderedDict()
    _decode_into(_as_bytes(payload), shapes, names, _as_spec(spec), seed, layouts)
    return layouts


# ----------------------------------------------------------------------------- error feedback


class ErrorFeedback:
    """Error-feedback memory (Stich et al. 2018; Karimireddy et al. 2019), one residual per name.

    ``compress`` sends C(x + e) and keeps e' = (x + e) - D(C(x + e)), so what a biased
    compressor (top-k) drops is sent in later rounds instead of lost: the sum of decoded
    messages tracks the sum of inputs up to the current residual. Keep one instance per
    client (uplink) or per server (downlink); it is client state, so checkpoint it with
    ``state_dict``. When the model grows, names that are no longer sent (an old head) are
    dropped and new names start from a zero residual.
    """

    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}

    def compress(
        self, tensors: Mapping[str, torch.Tensor], names: Sequence[str], spec: CompressionSpec | str, seed: int
    ) -> bytes:
        """Encode ``tensors + residual`` and update the residual from the locally decoded payload."""
        spec = _as_spec(spec)
        corrected: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name in names:
            x = _flat_float32(tensors, name).reshape(tensors[name].shape)
            residual = self.residuals.get(name)
            # a reshaped tensor of the same name is a new parameter: start it fresh
            corrected[name] = x + residual if residual is not None and residual.shape == x.shape else x
        payload = encode(corrected, names, spec, seed)
        # decode the real payload (not an encoder by-product) so the residual is what the receiver missed
        decoded = decode(payload, {name: tuple(t.shape) for name, t in corrected.items()}, names, spec, seed)
        self.residuals = {name: corrected[name] - decoded[name] for name in names}
        return payload

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the residuals by name."""
        return {name: r.clone() for name, r in self.residuals.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the residuals (float32 CPU copies)."""
        self.residuals = {name: r.detach().to("cpu", torch.float32).clone() for name, r in state.items()}


# ----------------------------------------------------------------------------- convenience


class Codec:
    """A parsed spec bound to its config key: ``Codec("lq8+sp25", "progfed_args.progfed_compression_up")``.

    Stateless: with ``+ef`` the caller passes the sender's :class:`ErrorFeedback` memory
    (one per client), so a trainer object that simulates many clients cannot mix residuals.
    """

    def __init__(self, spec_text: str, key: str) -> None:
        self.key = key
        self.spec = parse_spec(spec_text, key)

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
        """Encode with this spec; ``memory`` is required with ``+ef`` and refused without it."""
        if self.error_feedback != (memory is not None):
            raise ValueError(
                f"{self.key}={self.spec.text!r}: "
                + ("'ef' needs the sender's ErrorFeedback memory" if self.error_feedback else "an ErrorFeedback memory was given but the spec has no 'ef'")
            )
        return memory.compress(tensors, names, self.spec, seed) if memory is not None else encode(tensors, names, self.spec, seed)

    def decode(
        self, payload: PayloadLike, shapes: Mapping[str, Sequence[int]], names: Sequence[str], seed: int
    ) -> "OrderedDict[str, torch.Tensor]":
        """Decode with this spec (see :func:`decode`)."""
        return decode(payload, shapes, names, self.spec, seed)

    def information_bits(self, n_values: int) -> int:
        """See :func:`information_bits`."""
        return information_bits(self.spec, n_values)

    def __repr__(self) -> str:
        return f"Codec({self.spec.text!r}, {self.key!r})"
