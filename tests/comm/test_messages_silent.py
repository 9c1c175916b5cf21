"""The silent answer: a header alone, answering a server's broadcast or skip notice, that every runtime builds alike."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from fedml_progfed.comm.messages import HEADER_KEY, TYPES, Header, Message, nbytes, silent_answer
from fedml_progfed.errors import InvalidUpdateError

PLAN = {"stage": 2, "round": 5, "lr": 0.1}


def server_message(type_: str = "broadcast") -> "OrderedDict[str, torch.Tensor]":
    header = Header(type=type_, kind="values", algorithm="progfed", round=5, plan=PLAN, codec="lq8")
    return Message(header, OrderedDict([("blocks.0.0.weight", torch.ones(3, 3))])).pack()


def test_a_silent_answer_carries_the_broadcasts_round_and_plan_and_nothing_else():
    wire = silent_answer(server_message(), 3)
    assert list(wire) == [HEADER_KEY]  # no tensors, no metrics, no payload
    message = Message.unpack(wire, "silent")
    header = message.header
    assert "silent" in TYPES
    assert (header.type, header.kind, header.algorithm, header.round, header.client) == ("silent", "values", "progfed", 5, 3)
    assert dict(header.plan) == PLAN and not header.metrics and not message.tensors and message.payload is None


def test_the_header_or_the_wire_and_a_skip_notice_give_the_same_bytes():
    wire = server_message()
    from_header = silent_answer(Message.unpack(wire, "b").header, 3)
    from_wire = silent_answer(wire, 3)
    assert torch.equal(from_header[HEADER_KEY], from_wire[HEADER_KEY])
    assert torch.equal(silent_answer(server_message("skip"), 3)[HEADER_KEY], from_wire[HEADER_KEY])
    assert nbytes(from_wire) == from_wire[HEADER_KEY].numel() < 200


@pytest.mark.parametrize(
    "broadcast,client,problem",
    [
        (lambda: silent_answer(server_message(), 1), 1, "not a 'silent' message"),
        (lambda: Message(Header(type="update", kind="delta", algorithm="progfed", round=5, plan=PLAN, client=2)).pack(),
         2, "not a 'update' message"),
        (lambda: {"x": torch.zeros(1)}, 1, "no fedml_progfed header"),
        (server_message, -1, "client id >= 0"),
        (server_message, True, "client id >= 0"),
    ],
)
def test_only_a_server_message_and_a_client_id_are_answered(broadcast, client, problem):
    with pytest.raises(InvalidUpdateError, match=problem):
        silent_answer(broadcast(), client)
