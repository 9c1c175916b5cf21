"""The encode/decode pipeline: sparsify -> transforms -> value coding per tensor, and back.

Every stage is looked up in its registry (:mod:`~fedml_progfed.comm.codecs.stages`)
from the spec's fields, so this module names no codec. The position layouts come
from :mod:`~fedml_progfed.comm.codecs.sparsify` because every sparsifier shares them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Mapping, Sequence

import torch

from fedml_progfed.comm.codecs.sparsify import read_positions, write_positions
from fedml_progfed.comm.codecs.spec import CompressionSpec, as_spec
from fedml_progfed.comm.codecs.stages import (
    SPARSIFIERS,
    VALUE_CODINGS,
    TRANSFORMS,
    active_transforms,
    sparsifier_by_code,
    tensor_generator,
    value_coding,
)
from fedml_progfed.comm.codecs.wire_format import Header, MalformedPayloadError, PayloadLike, as_bytes, open_payload, seal


def _header(spec: CompressionSpec, count: int) -> Header:
    transforms = 0
    for t in active_transforms(spec):
        transforms |= t.flag
    sparsifier = SPARSIFIERS[spec.sparsifier].code if spec.sparsifier is not None else 0
    return Header(value_coding(spec).bits, sparsifier, transforms, spec.keep_percent, count)


def _describe(header: Header) -> str:
    """Readable spec of a header, for mismatch messages."""
    sparsifier = sparsifier_by_code(header.sparsifier)
    transforms = [t for _, t in TRANSFORMS.items() if header.transforms & t.flag]
    known_flags = sum(t.flag for t in transforms)
    if str(header.bits) not in VALUE_CODINGS or (header.sparsifier and sparsifier is None) or known_flags != header.transforms:
        return f"<unknown spec codes {header.bits}/{header.sparsifier}/{header.transforms}/{header.keep_percent}>"
    fields = {t.field: True for t in transforms}
    name = sparsifier.name if sparsifier is not None else None
    return CompressionSpec(bits=header.bits, sparsifier=name, keep_percent=header.keep_percent, **fields).text


def _flat_float32(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"cannot encode: tensor {name!r} is listed in names but missing from the tensors")
    x = tensors[name].detach().to("cpu", torch.float32).reshape(-1)
    # refused for every codec: a receiver must never have to guess what NaN meant
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"cannot encode tensor {name!r}: it holds NaN or infinite values")
    return x


def encode(tensors: Mapping[str, torch.Tensor], names: Sequence[str], spec: CompressionSpec | str, seed: int) -> bytes:
    """Encode ``tensors[name]`` for ``name in names`` into one payload (wire format in the package docstring).

    Parameters
    ----------
    tensors
        Float tensors by name (any float dtype or device; encoded as float32).
    names
        Which tensors, in which order; the decoder must be given the same list.
    spec
        A :class:`CompressionSpec` or spec string; ``ef`` is ignored here (see
        :class:`~fedml_progfed.comm.codecs.ErrorFeedback`).
    seed
        Seeds stochastic rounding, random positions and rotation signs (derived per tensor
        from ``seed`` and the name). The caller derives it from run, round and client, and
        the decoder must use the same one.

    Returns
    -------
    bytes
        The payload; send it as :func:`~fedml_progfed.comm.codecs.payload_to_tensor`.

    Raises
    ------
    ValueError
        For a tensor missing from ``tensors`` or holding NaN or infinite values (named),
        and for quantized values beyond ``quantize.MAX_ABS_SCALE``.

    Notes
    -----
    Quantization and random sparsification are unbiased (Konečný et al. 2016): the mean
    of decode(encode(x)) over seeds is x. Top-k is not (Stich et al. 2018).
    """
    spec = as_spec(spec)
    coding = value_coding(spec)
    sparsifier = SPARSIFIERS[spec.sparsifier] if spec.sparsifier is not None else None
    transforms = active_transforms(spec)
    chunks: list[bytes] = []
    for name in names:
        x = _flat_float32(tensors, name)
        values = x
        if sparsifier is not None:
            n, k = x.numel(), spec.kept(x.numel())
            if k == n:  # tiny tensors keep everything (and an empty one has no scale n/k)
                chunks.append(write_positions(torch.arange(n).numpy(), n, k, sparsifier))
            else:
                idx = sparsifier.select(x, k, tensor_generator(seed, name, "positions"))
                chunks.append(write_positions(idx.numpy(), n, k, sparsifier))
                values = x[idx] * sparsifier.scale(n, k)
        for transform in transforms:
            values = transform.forward(values, tensor_generator(seed, name, transform.purpose))
        if values is not x and not bool(torch.isfinite(values).all()):
            # finite input, but the n/k scale or a rotation overflowed float32
            raise ValueError(f"cannot encode tensor {name!r}: its values overflow float32 under {spec.text!r}")
        chunks.append(coding.encode(values, name, tensor_generator(seed, name, "rounding")))
    return seal(_header(spec, len(names)), b"".join(chunks))


def _decode_into(
    data: bytes,
    shapes: Mapping[str, Sequence[int]],
    names: Sequence[str],
    spec: CompressionSpec,
    seed: int,
    layouts: dict[str, str],
) -> "OrderedDict[str, torch.Tensor]":
    header, reader = open_payload(data)
    expected = _header(spec, len(names))
    if header.codes() != expected.codes():
        raise MalformedPayloadError(
            f"compressed payload was encoded as {_describe(header)!r} but the decoder expects {spec.text!r} "
            f"(both sides must use the same compression spec)"
        )
    if header.count != expected.count:
        raise MalformedPayloadError(f"compressed payload holds {header.count} tensors, the decoder expects {expected.count}")
    coding = value_coding(spec)
    sparsifier = SPARSIFIERS[spec.sparsifier] if spec.sparsifier is not None else None
    transforms = active_transforms(spec)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name in names:
        if name not in shapes:
            raise ValueError(f"cannot decode: tensor {name!r} is listed in names but has no shape")
        shape = tuple(int(s) for s in shapes[name])
        n = k = math.prod(shape)
        reader.context = f"tensor {name!r}"
        idx, layouts[name] = None, "dense"
        if sparsifier is not None:
            k = spec.kept(n)
            idx, layouts[name] = read_positions(reader, n, k, sparsifier, tensor_generator(seed, name, "positions"))
        values = coding.decode(reader, k)
        for transform in reversed(transforms):
            values = transform.inverse(values, tensor_generator(seed, name, transform.purpose))
        if idx is None:
            flat = values
        else:
            flat = torch.zeros(n, dtype=torch.float32)
            flat[idx] = values
        out[name] = flat.reshape(shape)
    reader.finish()
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
        Bytes, or the 1-D uint8 tensor from :func:`~fedml_progfed.comm.codecs.payload_to_tensor`.
    shapes
        Shape of every named tensor (the sub-model's; nothing about shapes is sent).
    names, spec, seed
        Exactly as given to :func:`encode`; shared-seed positions and rotation signs are
        redrawn from ``seed``.

    Raises
    ------
    MalformedPayloadError
        (an ``InvalidUpdateError`` and a ``ValueError``) for a payload that fails its CRC,
        is truncated or has trailing bytes, has another magic, format version, spec or
        tensor count, or holds invalid positions or quantization scales.
    """
    return _decode_into(as_bytes(payload), shapes, names, as_spec(spec), seed, {})


def payload_layouts(
    payload: PayloadLike, shapes: Mapping[str, Sequence[int]], names: Sequence[str], spec: CompressionSpec | str, seed: int
) -> "OrderedDict[str, str]":
    """How each tensor's positions travelled: ``dense``, ``all``, ``seed``, ``mask``, ``delta16`` or ``index32``."""
    layouts: OrderedDict[str, str] = OrderedDict()
    _decode_into(as_bytes(payload), shapes, names, as_spec(spec), seed, layouts)
    return layouts
