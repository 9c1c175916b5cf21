"""The server records a silent answer: neither merged nor dropped, named in ``silent_clients``, outside the quorum."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch

from fedml_progfed.comm.messages import Message, nbytes, silent_answer
from fedml_progfed.config import RunConfig
from fedml_progfed.core.staged_model import initialize
from fedml_progfed.engine import build_client, build_server
from fedml_progfed.engine.server import silent_column
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.models import build_model
from fedml_progfed.tasks.classification import ClassificationTask
from round_steps import aggregate, broadcast

CONFIG = RunConfig().replace(comm_round=8, client_num_in_total=4, client_num_per_round=4, progfed={"stages": 4})
CPU = torch.device("cpu")


def make(config: RunConfig = CONFIG):
    task = ClassificationTask()
    model = lambda: initialize(build_model("convnet", (1, 28, 28), 10, 4), config.random_seed)  # noqa: E731
    return build_server(config, model(), task), build_client(config, model(), task)


def upload(server, client, client_id: int):
    g = torch.Generator().manual_seed(client_id)
    client.receive(broadcast(server, client_id))
    client.train([(torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g))], CPU, client_id)
    return client.upload()


def silent(server, client_id: int):
    return silent_answer(broadcast(server, client_id), client_id)


def test_a_silent_answer_is_recorded_and_the_model_is_the_one_without_that_client():
    alone, alone_client = make()
    aggregate(alone, [(10, upload(alone, alone_client, 0)), (30, upload(alone, alone_client, 2))])
    server, client = make()
    sent = {c: nbytes(broadcast(server, c)) for c in range(4)}
    good = [upload(server, client, 0), upload(server, client, 2)]
    aggregate(server, [(10, good[0]), (0, silent(server, 3)), (30, good[1]), (10, silent(server, 1))])
    for name, value in alone.model.state_dict().items():
        assert torch.equal(server.model.state_dict()[name], value), name
    row = server.state.ledger.rows[-1]
    assert row["silent_clients"] == "1 3" and row["dropped_clients"] == 0 and row["num_clients"] == 2
    assert row["bytes_down"] == sum(sent.values())  # a silent client was sent its broadcast
    assert row["bytes_up"] == nbytes(good[0]) + nbytes(good[1])  # and sent nothing back
    records = {c["client"]: c for c in server.state.ledger.per_client()}
    assert records[3] == {"round": 0, "client": 3, "bytes_down": sent[3], "bytes_up": 0, "silent": True}
    assert alone.state.ledger.rows[-1]["silent_clients"] == ""


def test_silent_answers_do_not_make_a_quorum_and_the_log_says_how_many(caplog):
    server, client = make(CONFIG.replace(progfed={"min_clients": 2}))
    before = copy.deepcopy(server.model.state_dict())
    good = upload(server, client, 0)
    with caplog.at_level(logging.WARNING, logger="fedml_progfed"):
        aggregate(server, [(10, good), (0, silent(server, 1)), (0, silent(server, 2)), (0, silent(server, 3))])
    assert all(torch.equal(before[k], v) for k, v in server.model.state_dict().items())
    row = server.state.ledger.rows[-1]
    assert (row["num_clients"], row["dropped_clients"], row["silent_clients"]) == (0, 0, "1 2 3")
    assert row["client_flops"] == 0 and server.state.round == 1
    assert "round 0: 1 valid updates (3 clients silent), fewer than progfed_min_clients (2)" in caplog.text


def test_a_round_where_every_client_is_silent_keeps_the_model():
    server, _ = make()
    before = copy.deepcopy(server.model.state_dict())
    broadcast(server)
    aggregate(server, [(0, silent(server, c)) for c in (2, 0, 3, 1)])
    assert all(torch.equal(before[k], v) for k, v in server.model.state_dict().items())
    row = server.state.ledger.rows[-1]
    assert (row["num_clients"], row["silent_clients"], row["bytes_up"]) == (0, "0 1 2 3", 0)


def _forge(wire, **changes):
    message = Message.unpack(wire, "t")
    message.header = dataclasses.replace(message.header, **changes)
    return message.pack()


@pytest.mark.parametrize(
    "forge,problem",
    [
        (lambda s: _forge(s, round=3), "claims round 3"),
        (lambda s: _forge(s, plan={**Message.unpack(s, "t").header.plan, "stage": 2}), "plan is round 0"),
        (lambda s: _forge(s, algorithm="other"), "algorithm 'other'"),
        (lambda s: {**s, "blocks.0.0.weight": torch.zeros(3)}, "a silent answer carries 1 tensors"),
        (lambda s: _forge(s, metrics={"samples": 1.0, "train_loss": 0.0, "flops": 0.0, "compute_s": 0.0}),
         "carries 0 tensors and metrics"),
    ],
)
def test_a_silent_answer_for_another_round_or_with_content_is_dropped(forge, problem):
    server, client = make()
    good = upload(server, client, 0)
    aggregate(server, [(10, good), (0, forge(silent(server, 1)))])
    row = server.state.ledger.rows[-1]
    assert (row["num_clients"], row["dropped_clients"], row["silent_clients"]) == (1, 1, "")
    dropped = [c for c in server.state.ledger.per_client() if "dropped" in c]
    assert dropped[0]["client"] == 1 and problem in dropped[0]["dropped"], dropped[0]["dropped"]
    abort, abort_client = make(CONFIG.replace(progfed={"invalid_update": "abort"}))
    with pytest.raises(InvalidUpdateError, match=problem):
        aggregate(abort, [(10, upload(abort, abort_client, 0)), (0, forge(silent(abort, 1)))])


def test_a_silent_answer_for_the_previous_round_is_dropped():
    server, client = make()
    stale = silent(server, 1)  # answers round 0
    aggregate(server, [(10, upload(server, client, 0)), (10, upload(server, client, 1))])
    aggregate(server, [(10, upload(server, client, 0)), (0, stale)])
    row = server.state.ledger.rows[-1]
    assert (row["round"], row["dropped_clients"], row["silent_clients"]) == (1, 1, "")


def test_the_column_lists_ids_ascending():
    others = [{"client": 7, "silent": True}, {"client": 2, "dropped": "x"}, {"client": 3, "silent": True},
              {"client": 1, "skipped": True}]
    assert silent_column(others) == "3 7" and silent_column([]) == ""
