"""The gRPC wire format: a typed JSON header plus raw tensors, and nothing that can run code.

FedML pickles every ``Message``; unpickling bytes from the network runs whatever
they say (``__reduce__``). Our gRPC transport sends a message as::

    b"PFW1" | safetensors bytes

where the safetensors part (8-byte little-endian header length, JSON header with
each tensor's dtype, shape and byte range, then the raw bytes) carries, in its
``__metadata__``, the **envelope header** (JSON)::

    {"v": 1, "type": 3, "sender": 1, "receiver": 0, "run": "job-7", "round": 4,
     "plan": {...}, "client": 0, "params": {"num_samples": 600, ...},
     "tensors": {"model_params": ["__progfed_header__", "blocks.0.weight", ...]}}

``type``, ``sender`` and ``receiver`` are FedML's; ``run`` is the job's run id;
``round``, ``plan`` and ``client`` are read from our message header inside
``model_params`` (:mod:`fedml_progfed.comm.messages`) so a receiver can judge
freshness before it hands anything to FedML. ``params`` holds FedML's other
parameters, which must be JSON scalars; ``tensors`` names, in order, the entries of
each parameter that is a dict of tensors. Decoding parses JSON and copies bytes
into tensors of the stated dtypes and shapes (the safetensors library checks every
byte range); anything else is refused with :class:`RefusedMessage`.
"""

from __future__ import annotations

import json
import math
import numbers
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

MAGIC = b"PFW1"
VERSION = 1
#: Largest envelope header (JSON) accepted: names of a few thousand tensors fit many times over.
MAX_HEADER_BYTES = 4 << 20
#: FedML's own fields of every message; the rest of its parameters travel in ``params``.
_OWN = ("msg_type", "sender", "receiver")
_PICKLE_PROTOCOL_OPCODE = 0x80


class RefusedMessage(ValueError):
    """Bytes that are not a message of ours (or break its bounds); the reason names what is wrong."""


@dataclass(frozen=True)
class Envelope:
    """A decoded message: the envelope header and FedML's parameters (tensor dicts rebuilt in order)."""

    type: int | str
    sender: int
    receiver: int
    run: str
    round: int | None
    plan: Any
    client: int | None
    params: dict[str, Any]


def _scalar(key: str, value: Any) -> Any:
    """A parameter value that JSON carries exactly, or TypeError (a bug of the sender: say which key)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            raise TypeError(f"message parameter {key!r} is {number}, which the wire format does not carry")
        return number
    raise TypeError(f"message parameter {key!r} is a {type(value).__name__}; the wire format carries JSON "
                    f"scalars and dicts of tensors only")


def _our_header(params: Mapping[str, Any]) -> tuple[int | None, Any, int | None]:
    """Round, plan and client from our header inside ``model_params``, if the message carries one."""
    from fedml_progfed.comm.messages import HEADER_KEY, Header

    wire = params.get("model_params")
    if not isinstance(wire, Mapping) or HEADER_KEY not in wire:
        return None, None, None
    header = Header.from_tensor(wire[HEADER_KEY], "an outgoing message")
    return header.round, dict(header.plan), header.client


def encode(params: Mapping[str, Any], run_id: str) -> bytes:
    """The bytes of one FedML message (its ``msg_params``) for the wire.

    Raises
    ------
    TypeError
        A parameter that is neither a JSON scalar nor a dict of tensors (the sender's bug).
    """
    from safetensors.torch import save

    header: dict[str, Any] = {"v": VERSION, "run": str(run_id)}
    for key in _OWN:
        header[key.replace("msg_", "")] = _scalar(key, params.get(key))
    header["round"], header["plan"], header["client"] = _our_header(params)
    scalars: dict[str, Any] = {}
    names: dict[str, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in params.items():
        if key in _OWN:
            continue
        if isinstance(value, Mapping):
            names[key] = []
            for index, (name, tensor) in enumerate(value.items()):
                if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                    raise TypeError(f"message parameter {key!r}: entry {name!r} is not a named tensor")
                names[key].append(name)
                tensors[f"{key}/{index}"] = tensor.detach().to("cpu").contiguous()
        else:
            scalars[key] = _scalar(key, value)
    header["params"], header["tensors"] = scalars, names
    text = json.dumps(header, separators=(",", ":"), allow_nan=False)
    try:
        body = save(tensors, metadata={"progfed": text})
    except RuntimeError:  # tensors sharing storage: safetensors refuses aliases, copies do not alias
        body = save({k: t.clone() for k, t in tensors.items()}, metadata={"progfed": text})
    return MAGIC + body


def _refuse_prefix(data: bytes) -> None:
    if data[:4] == MAGIC:
        return
    if data[:1] and data[0] == _PICKLE_PROTOCOL_OPCODE:
        raise RefusedMessage("the body is a pickle (FedML's format); this transport decodes no pickles")
    raise RefusedMessage(f"the body does not start with {MAGIC!r} ({len(data)} bytes)")


def _metadata(data: bytes) -> dict[str, Any]:
    """The envelope header, read with bounds before the tensors are touched."""
    if len(data) < 12:
        raise RefusedMessage("the body is too short for a header")
    (length,) = struct.unpack("<Q", data[4:12])
    if length > MAX_HEADER_BYTES or 12 + length > len(data):
        raise RefusedMessage(f"the header claims {length} bytes (at most {MAX_HEADER_BYTES}, {len(data) - 12} present)")
    try:
        layout = json.loads(data[12:12 + length])
        header = json.loads(layout["__metadata__"]["progfed"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise RefusedMessage("the header is not the JSON of a fedml_progfed message") from None
    if not isinstance(header, dict) or header.get("v") != VERSION:
        raise RefusedMessage(f"the header is not version {VERSION} of the fedml_progfed wire format")
    return header


def _field(header: Mapping[str, Any], name: str, kinds: tuple[type, ...], optional: bool = False) -> Any:
    value = header.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise RefusedMessage(f"header field {name!r} is {type(value).__name__}, not {' or '.join(k.__name__ for k in kinds)}")
    return value


def decode(data: bytes, max_bytes: int) -> Envelope:
    """Check and decode one message; never runs code from ``data``.

    Raises
    ------
    RefusedMessage
        Too large, a pickle, not our layout, a malformed header or tensor table.
    """
    from safetensors.torch import load

    if len(data) > max_bytes:
        raise RefusedMessage(f"{len(data)} bytes, more than this job's limit of {max_bytes}")
    _refuse_prefix(data)
    header = _metadata(data)
    kind = header.get("type")
    if not isinstance(kind, (int, str)) or isinstance(kind, bool):
        raise RefusedMessage("header field 'type' is not a message type")
    sender, receiver = _field(header, "sender", (int,)), _field(header, "receiver", (int,))
    run = _field(header, "run", (str,))
    round_ = _field(header, "round", (int,), optional=True)
    client = _field(header, "client", (int,), optional=True)
    scalars, names = header.get("params"), header.get("tensors")
    if not isinstance(scalars, dict) or not isinstance(names, dict):
        raise RefusedMessage("header fields 'params' and 'tensors' must be JSON objects")
    if any(isinstance(v, (dict, list)) for v in scalars.values()):
        raise RefusedMessage("a parameter in 'params' is not a JSON scalar")
    try:
        flat = load(data[4:])
    except Exception as exc:  # noqa: BLE001 - the library's error types differ by version; all mean malformed
        raise RefusedMessage(f"the tensor table is malformed ({type(exc).__name__}: {str(exc)[:200]})") from None
    params: dict[str, Any] = {"msg_type": kind, "sender": sender, "receiver": receiver, **scalars}
    expected = 0
    for key, entries in names.items():
        if key in params or not isinstance(entries, list) or not all(isinstance(n, str) for n in entries):
            raise RefusedMessage(f"the tensor list of {key!r} is malformed")
        try:
            params[key] = OrderedDict((name, flat[f"{key}/{i}"]) for i, name in enumerate(entries))
        except KeyError as missing:
            raise RefusedMessage(f"tensor {missing} named in the header is not in the body") from None
        expected += len(entries)
    if expected != len(flat):
        raise RefusedMessage(f"the body holds {len(flat)} tensors, the header names {expected}")
    # the receiver judges freshness by the envelope; the engine by the header inside: they must agree
    from fedml_progfed.errors import InvalidUpdateError

    try:
        inner = _our_header(params)
    except InvalidUpdateError as exc:
        raise RefusedMessage(f"the message header inside model_params is malformed ({exc})") from None
    if inner != (round_, header.get("plan"), client):
        raise RefusedMessage("the envelope's round, plan or client differs from the message header inside it")
    return Envelope(kind, sender, receiver, run, round_, header.get("plan"), client, params)


def message_limit(state: Mapping[str, torch.Tensor]) -> int:
    """Largest message a job accepts: the full model's tensors once and a half, plus 4 MiB for headers.

    A broadcast or update carries at most the full model (values or changes, plus an
    encoded payload no larger than the values it replaces), so anything larger is refused.
    """
    total = sum(t.numel() * t.element_size() for t in state.values())
    return int(1.5 * total) + (4 << 20)
