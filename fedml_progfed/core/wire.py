"""What travels between server and clients, and how many bytes it is.

A message is an ``OrderedDict[name -> tensor]``: the sub-model's tensors by
full-model name plus a few metadata tensors (stage, round, and on the uplink the
sample count, training loss and FLOPs). Keeping everything a tensor satisfies
FedML, which calls ``.to(device)`` on every value of a client upload (FEDML_NOTES).
Bytes are counted from the tensors actually in the message, metadata included.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch

from fedml_progfed.errors import InvalidUpdateError

META_PREFIX = "__progfed_"
STAGE = "__progfed_stage__"
ROUND = "__progfed_round__"
SAMPLES = "__progfed_samples__"
TRAIN_LOSS = "__progfed_train_loss__"
FLOPS = "__progfed_flops__"
CLIENT = "__progfed_client__"
# An encoded (compressed) block of float tensors, one uint8 tensor (core/compression.py).
PAYLOAD = "__progfed_payload"

_INT_META = (STAGE, ROUND, SAMPLES, FLOPS, CLIENT)


def pack(tensors: Mapping[str, torch.Tensor], **meta: float | int) -> "OrderedDict[str, torch.Tensor]":
    """Build a message from CPU copies of ``tensors`` and metadata given by short name (stage=, round=, ...)."""
    message: OrderedDict[str, torch.Tensor] = OrderedDict((k, v.detach().to("cpu")) for k, v in tensors.items())
    for short, value in meta.items():
        key = f"{META_PREFIX}{short}__"
        dtype = torch.int64 if key in _INT_META else torch.float64
        message[key] = torch.tensor(value, dtype=dtype)
    return message


def unpack(message: Mapping[str, torch.Tensor], what: str) -> tuple["OrderedDict[str, torch.Tensor]", dict[str, float | int]]:
    """Split a message into (tensors, metadata by short name); a message without a stage tag is rejected."""
    if not isinstance(message, Mapping):
        raise InvalidUpdateError(f"{what}: expected a mapping of names to tensors, got {type(message).__name__}")
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    meta: dict[str, float | int] = {}
    for key, value in message.items():
        if key.startswith(META_PREFIX) and key != PAYLOAD:
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise InvalidUpdateError(f"{what}: metadata {key} must be a one-element tensor")
            short = key[len(META_PREFIX):-2]
            meta[short] = int(value.item()) if key in _INT_META else float(value.item())
        else:
            tensors[key] = value
    if "stage" not in meta or "round" not in meta:
        raise InvalidUpdateError(
            f"{what}: the message carries no stage/round tag; it was not produced by fedml_progfed's trainer "
            f"or aggregator (use ProgFedClientTrainer and ProgFedServerAggregator on both sides)"
        )
    return tensors, meta


def payload_nbytes(message: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data in a message: every value, metadata included."""
    return sum(t.numel() * t.element_size() for t in message.values())


def encode_tensors(codec, tensors: Mapping[str, torch.Tensor], names: list[str], seed: int, memory=None) -> "OrderedDict[str, torch.Tensor]":
    """Message entries for ``names``: floating tensors encoded by ``codec`` into one uint8 payload,
    others (e.g. BatchNorm's integer step counters) sent as they are."""
    from fedml_progfed.core.compression import payload_to_tensor

    floats = [n for n in names if tensors[n].is_floating_point()]
    entries: OrderedDict[str, torch.Tensor] = OrderedDict((n, tensors[n]) for n in names if not tensors[n].is_floating_point())
    if floats:
        entries[PAYLOAD] = payload_to_tensor(codec.encode({n: tensors[n] for n in floats}, floats, seed, memory))
    return entries


def decode_tensors(
    codec, entries: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], names: list[str], seed: int, what: str
) -> "OrderedDict[str, torch.Tensor]":
    """Inverse of :func:`encode_tensors`; shapes and floatness come from ``reference`` (the receiver's model)."""
    missing = [n for n in names if n not in reference]
    if missing:
        raise InvalidUpdateError(f"{what}: the receiver's model has no {missing[:3]}")
    floats = [n for n in names if reference[n].is_floating_point()]
    plain = {k: v for k, v in entries.items() if k != PAYLOAD}
    expected_plain = [n for n in names if n not in set(floats)]
    if sorted(plain) != sorted(expected_plain) or (bool(floats) != (PAYLOAD in entries)):
        raise InvalidUpdateError(
            f"{what}: the encoded message does not match the sub-model (plain entries {sorted(plain)[:3]}, "
            f"expected {expected_plain[:3]}); the sender must build the same model, stage and compression"
        )
    decoded = codec.decode(entries[PAYLOAD], {n: tuple(reference[n].shape) for n in floats}, floats, seed) if floats else {}
    return OrderedDict((n, decoded[n] if n in decoded else plain[n]) for n in names)
