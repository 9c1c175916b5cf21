"""What travels between server and clients: a header plus name-addressed tensors.

A message is an ``OrderedDict[str, Tensor]`` on the wire, because FedML moves
dicts of tensors and calls ``.to(device)`` on every value of an upload
(FEDML_NOTES). It holds:

* the **header** (``__progfed_header__``): compact JSON in a ``uint8`` tensor with
  the message ``type`` (``broadcast``, ``update``, ``skip``, ``silent``), its ``kind``, the
  algorithm, the round, the round's **plan tag** (the server decides what a round
  trains; clients follow the tag), the codec, and on updates the client id;
* on updates, the client's measurements (``__progfed_metrics__``: samples, loss,
  FLOPs, seconds) as four float64 values;
* the **tensors**, by full-model name.

A ``silent`` answer (:func:`silent_answer`) stands for a client that was sent a round
and sent nothing back (seeded ``progfed.client_dropout``, or a silo the round deadline
left out): the broadcast's round and plan, the client id, no tensors, no metrics.

Kinds, and how :func:`decode` reads them (one path for all):

``values``   plain tensors are the values themselves (float broadcasts).
``delta``    plain tensors are changes since the broadcast the client trained
             from (float updates).
``encoded``  the parameters travel in ONE ``uint8`` payload
             (``__progfed_payload__``) written by a codec
             (:mod:`fedml_progfed.comm.codecs`): values in a broadcast, changes in
             an update. Buffers and integer tensors travel beside it, exact, as
             values: a lossy codec never touches normalisation statistics.

Bytes are counted from every tensor in the message, header and payload included.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from fedml_progfed.core.staged_model import check_names
from fedml_progfed.errors import InvalidUpdateError

_FOLLOW_PLAN = "the sender must build the same model and follow the broadcast's plan"

HEADER_KEY = "__progfed_header__"
METRICS_KEY = "__progfed_metrics__"
PAYLOAD_KEY = "__progfed_payload__"
TYPES = ("broadcast", "update", "skip", "silent")
#: What a server sends; a silent answer answers one of these.
SERVER_TYPES = ("broadcast", "skip")
KINDS = ("values", "delta", "encoded")
#: Measurements an update reports, in the order of the float64 metrics tensor. A fixed-size
#: tensor, not JSON, so a message's byte count does not depend on the digits of a timing.
#: FLOPs are exact as float64 below 2**53 (9e15 per client and round).
METRICS = ("samples", "train_loss", "flops", "compute_s")
#: What a client's record-level DP-SGD did this round (the server's accountant charges it), in
#: their own float64 tensor, present only in runs with ``dp_solution_type: sample``.
DP_SGD_KEY = "__progfed_dp_sgd__"
DP_SGD_METRICS = ("dp_records", "dp_steps", "dp_sample_rate")
#: Largest header accepted: a forged giant header is refused before it is parsed.
MAX_HEADER_BYTES = 1 << 16


@dataclass(frozen=True)
class Header:
    """The metadata of a message (see the module docstring)."""

    type: str
    kind: str
    algorithm: str
    round: int
    plan: Mapping[str, Any] = field(default_factory=dict)
    codec: str = "float"
    client: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    seeded: tuple[str, ...] = ()
    #: Tensors of the sub-model left out because the receiver holds them already, and a CRC-32
    #: of their values in name order, so a receiver that holds another copy is refused.
    cached: tuple[str, ...] = ()
    cached_crc: int | None = None
    #: Tensors sent as their change since the receiver's copy (a per-client broadcast), and a
    #: CRC-32 of that copy, so a receiver holding another base refuses instead of drifting.
    changes: tuple[str, ...] = ()
    changes_crc: int | None = None

    def to_tensor(self) -> torch.Tensor:
        record = {
            "type": self.type, "kind": self.kind, "algorithm": self.algorithm, "round": self.round,
            "plan": dict(self.plan), "codec": self.codec,
        }
        if self.client is not None:
            record["client"] = self.client
        if self.seeded:
            record["seeded"] = list(self.seeded)
        if self.cached:
            record["cached"], record["cached_crc"] = list(self.cached), self.cached_crc
        if self.changes:
            record["changes"], record["changes_crc"] = list(self.changes), self.changes_crc
        text = json.dumps(record, separators=(",", ":"), sort_keys=True, allow_nan=True)
        return torch.from_numpy(np.frombuffer(text.encode(), dtype=np.uint8).copy())

    @classmethod
    def from_tensor(cls, tensor: Any, what: str, sender: Callable[[int], str] | None = None) -> "Header":
        """Parse and check a header; anything malformed is an :class:`InvalidUpdateError`.

        ``sender(client)`` relabels errors once the header's client id is known, so a
        malformed update still names the client that sent it.
        """
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
            raise InvalidUpdateError(f"{what}: the header is not a 1-D uint8 tensor")
        if tensor.numel() > MAX_HEADER_BYTES:
            raise InvalidUpdateError(f"{what}: the header has {tensor.numel()} bytes, more than {MAX_HEADER_BYTES}")
        try:
            record = json.loads(tensor.cpu().numpy().tobytes().decode())
        except (UnicodeDecodeError, ValueError):
            raise InvalidUpdateError(f"{what}: the header is not valid JSON") from None
        if not isinstance(record, dict):
            raise InvalidUpdateError(f"{what}: the header is not a JSON object")
        client = record.get("client")
        if sender is not None and isinstance(client, int) and not isinstance(client, bool):
            what = sender(client)
        header = cls(
            type=_choice(record.get("type"), TYPES, "type", what),
            kind=_choice(record.get("kind"), KINDS, "kind", what),
            algorithm=_typed(record.get("algorithm"), "a string", "algorithm", what),
            round=_typed(record.get("round"), "an integer", "round", what),
            plan=_typed(record.get("plan", {}), "a mapping", "plan", what),
            codec=_typed(record.get("codec", "float"), "a string", "codec", what),
            client=None if record.get("client") is None else _typed(record["client"], "an integer", "client", what),
            seeded=tuple(_typed(v, "a string", "seeded", what) for v in _typed(record.get("seeded", []), "a list", "seeded", what)),
            cached=tuple(_typed(v, "a string", "cached", what) for v in _typed(record.get("cached", []), "a list", "cached", what)),
            cached_crc=None if record.get("cached_crc") is None else _typed(record["cached_crc"], "an integer", "cached_crc", what),
            changes=tuple(_typed(v, "a string", "changes", what) for v in _typed(record.get("changes", []), "a list", "changes", what)),
            changes_crc=None if record.get("changes_crc") is None else _typed(record["changes_crc"], "an integer", "changes_crc", what),
        )
        return header


def _choice(value: Any, allowed: Sequence[str], name: str, what: str) -> str:
    if value not in allowed:
        raise InvalidUpdateError(f"{what}: header {name} {value!r} is not one of {', '.join(allowed)}")
    return value


_TYPES: dict[str, Callable[[Any], bool]] = {
    "a string": lambda v: isinstance(v, str),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a mapping": lambda v: isinstance(v, dict),
    "a list": lambda v: isinstance(v, list),
}


def _typed(value: Any, kind: str, name: str, what: str) -> Any:
    if not _TYPES[kind](value):
        raise InvalidUpdateError(f"{what}: header {name} {value!r} is not {kind}"[:500])
    return value


def _metrics_tensor(metrics: Mapping[str, float]) -> torch.Tensor:
    return torch.tensor([float(metrics[name]) for name in METRICS], dtype=torch.float64)


def _read_metrics(value: Any, what: str) -> dict[str, float]:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float64 or tuple(value.shape) != (len(METRICS),):
        raise InvalidUpdateError(f"{what}: the metrics are not {len(METRICS)} float64 values ({', '.join(METRICS)})")
    out = dict(zip(METRICS, value.tolist()))
    for name, number in out.items():
        # train_loss may be NaN for a client with no batches; every other metric must be finite.
        if name != "train_loss" and not math.isfinite(number):
            raise InvalidUpdateError(f"{what}: header metric {name} = {number!r} is not a finite number")
    return out


def _read_dp_sgd(value: Any, what: str) -> dict[str, float]:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float64 or tuple(value.shape) != (len(DP_SGD_METRICS),):
        raise InvalidUpdateError(f"{what}: the DP-SGD report is not {len(DP_SGD_METRICS)} float64 values "
                                 f"({', '.join(DP_SGD_METRICS)})")
    out = dict(zip(DP_SGD_METRICS, value.tolist()))
    if not all(math.isfinite(v) for v in out.values()):
        raise InvalidUpdateError(f"{what}: the DP-SGD report {out} holds a non-finite number")
    return out


@dataclass
class Message:
    """A decoded-header message: header, plain tensors, and the codec payload if ``kind == 'encoded'``."""

    header: Header
    tensors: "OrderedDict[str, torch.Tensor]" = field(default_factory=OrderedDict)
    payload: torch.Tensor | None = None

    def pack(self) -> "OrderedDict[str, torch.Tensor]":
        """The wire form: an OrderedDict of CPU tensors (header first, payload last)."""
        wire: OrderedDict[str, torch.Tensor] = OrderedDict([(HEADER_KEY, self.header.to_tensor())])
        if self.header.metrics:
            wire[METRICS_KEY] = _metrics_tensor(self.header.metrics)
            if all(name in self.header.metrics for name in DP_SGD_METRICS):
                wire[DP_SGD_KEY] = torch.tensor([float(self.header.metrics[n]) for n in DP_SGD_METRICS], dtype=torch.float64)
        for name, tensor in self.tensors.items():
            wire[name] = tensor.detach().to("cpu")
        if self.payload is not None:
            wire[PAYLOAD_KEY] = self.payload
        return wire

    @classmethod
    def unpack(cls, wire: Any, what: str, sender: Callable[[int], str] | None = None) -> "Message":
        """Split a wire dict into header, tensors and payload; a foreign message is refused.

        ``sender`` names the client in errors once its id is read (see :meth:`Header.from_tensor`).
        """
        if not isinstance(wire, Mapping):
            raise InvalidUpdateError(f"{what}: expected a mapping of names to tensors, got {type(wire).__name__}")
        if HEADER_KEY not in wire:
            raise InvalidUpdateError(
                f"{what}: the message carries no fedml_progfed header; it was not produced by fedml_progfed "
                f"(use ProgFedClientTrainer and ProgFedServerAggregator on both sides, same package version)"
            )
        header = Header.from_tensor(wire[HEADER_KEY], what, sender)
        if sender is not None and header.client is not None:
            what = sender(header.client)
        if METRICS_KEY in wire:
            header = replace(header, metrics=_read_metrics(wire[METRICS_KEY], what))
        if DP_SGD_KEY in wire:
            header = replace(header, metrics={**header.metrics, **_read_dp_sgd(wire[DP_SGD_KEY], what)})
        tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, value in wire.items():
            if name in (HEADER_KEY, METRICS_KEY, PAYLOAD_KEY, DP_SGD_KEY):
                continue
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise InvalidUpdateError(f"{what}: entry {name!r} is a {type(value).__name__}, not a named tensor")
            tensors[name] = value
        payload = wire.get(PAYLOAD_KEY)
        if (payload is not None) != (header.kind == "encoded"):
            raise InvalidUpdateError(f"{what}: a {header.kind!r} message {'has' if payload is not None else 'lacks'} a payload")
        if payload is not None and not isinstance(payload, torch.Tensor):
            raise InvalidUpdateError(f"{what}: the payload is not a tensor")
        return cls(header, tensors, payload)


def silent_answer(broadcast: "Mapping[str, Any] | Header", client: int) -> "OrderedDict[str, torch.Tensor]":
    """The answer of ``client`` when it did not train the round ``broadcast`` opened.

    Sent by a client that stays silent (:func:`~fedml_progfed.engine.dropout.stays_silent`)
    or made by a transport for a silo that sent nothing in time; the server records it in
    ``silent_clients``, merges nothing of it and counts it neither as a valid update nor as
    a dropped one. Every runtime builds it here, so its bytes are the same everywhere.

    Parameters
    ----------
    broadcast
        What the server sent ``client`` this round: its wire message, or that message's
        :class:`Header` (a client that keeps only the header).
    client
        The data silo the round assigned (the id an update of it would carry).

    Returns
    -------
    OrderedDict[str, Tensor]
        The wire message: a header only (type ``silent``, kind ``values``, the broadcast's
        algorithm, round and plan tag, ``client``), no tensors and no metrics.

    Raises
    ------
    InvalidUpdateError
        If ``broadcast`` is not a server's broadcast or skip notice.
    """
    header = broadcast if isinstance(broadcast, Header) else Message.unpack(broadcast, "the broadcast a silent answer answers").header
    if header.type not in SERVER_TYPES:
        raise InvalidUpdateError(
            f"a silent answer answers a server's {' or '.join(SERVER_TYPES)}, not a {header.type!r} message"
        )
    if isinstance(client, bool) or not isinstance(client, int) or client < 0:
        raise InvalidUpdateError(f"a silent answer needs a client id >= 0, got {client!r}")
    silent = Header(type="silent", kind="values", algorithm=header.algorithm, round=header.round,
                    plan=dict(header.plan), client=client)
    return Message(silent).pack()


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's bytes as stored, whatever its dtype (for digests and checksums)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def values_crc(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> int:
    """CRC-32 of the named tensors' bytes, in the given order (what both ends compute for cached tensors)."""
    import zlib

    crc = 0
    for name in names:
        crc = zlib.crc32(raw_bytes(tensors[name]), crc)
    return crc


def nbytes(wire: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data in a wire message: every value, header and payload included."""
    return sum(t.numel() * t.element_size() for t in wire.values())


def encode_entries(
    tensors: Mapping[str, torch.Tensor],
    names: Sequence[str],
    lossy: set[str],
    codec,
    seed: int,
    memory=None,
) -> tuple["OrderedDict[str, torch.Tensor]", torch.Tensor | None]:
    """Plain entries and payload for ``names``: the ``lossy`` ones through ``codec``, the rest exact."""
    from fedml_progfed.comm.codecs import payload_to_tensor

    encoded = [n for n in names if n in lossy]
    plain = OrderedDict((n, tensors[n]) for n in names if n not in lossy)
    payload = payload_to_tensor(codec.encode({n: tensors[n] for n in encoded}, encoded, seed, memory)) if encoded else None
    return plain, payload


def decode(
    message: Message,
    names: Sequence[str],
    lossy: set[str],
    shapes: Mapping[str, Sequence[int]],
    codec,
    seed: int,
    what: str,
) -> tuple["OrderedDict[str, torch.Tensor]", set[str]]:
    """The message's tensors for exactly ``names``, and which of them are changes (not values).

    ``lossy`` and ``shapes`` come from the receiver's own model: nothing about which
    names are parameters or their shapes is taken from the sender. Raises
    :class:`InvalidUpdateError` when the entries do not match ``names``.
    """
    kind = message.header.kind
    plain = message.tensors
    if kind == "encoded":
        in_payload = [n for n in names if n in lossy]
        expected_plain = [n for n in names if n not in lossy]
        check_names(expected_plain, plain, what, _FOLLOW_PLAN)
        if not in_payload:
            raise InvalidUpdateError(f"{what}: an encoded message for tensors without parameters")
        try:
            decoded = codec.decode(message.payload, {n: shapes[n] for n in in_payload}, in_payload, seed)
        except ValueError as exc:  # MalformedPayloadError is one too: name the sender
            raise InvalidUpdateError(f"{what}: {exc}") from None
        deltas = set(in_payload) if message.header.type == "update" else set()
        merged = OrderedDict((n, decoded[n] if n in decoded else plain[n]) for n in names)
        return merged, deltas
    check_names(names, plain, what, _FOLLOW_PLAN)
    return OrderedDict((n, plain[n]) for n in names), set(names) if kind == "delta" else set()
