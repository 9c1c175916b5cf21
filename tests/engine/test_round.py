"""The round object: built once per round, one assignment and one message per client, two server halves."""

from __future__ import annotations

import pytest
import torch

from fedml_progfed.comm.messages import Message, nbytes
from fedml_progfed.config import RunConfig
from fedml_progfed.core.staged_model import initialize
from fedml_progfed.engine import build_client, build_server
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.models import build_model
from fedml_progfed.tasks.classification import ClassificationTask

CPU = torch.device("cpu")
CLIENTS = 3


def make_model():
    return initialize(build_model("convnet", (1, 28, 28), 10, 4), 0)


def data(client: int):
    g = torch.Generator().manual_seed(client)
    return [(torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g))]


def counted(algorithm) -> list[int]:
    """Count every layout computation of ``algorithm`` (the instance's method is wrapped)."""
    calls = [0]
    original = algorithm.layout

    def layout(model, plan):
        calls[0] += 1
        return original(model, plan)

    algorithm.layout = layout
    return calls


def test_layout_is_computed_once_per_round_on_the_server_and_once_per_round_on_each_client():
    config = RunConfig().replace(comm_round=8, client_num_in_total=CLIENTS, client_num_per_round=CLIENTS,
                                 progfed={"schedule": (2, 2, 2, 2)})
    task = ClassificationTask()
    server = build_server(config, make_model(), task)
    clients = [build_client(config, make_model(), task) for _ in range(CLIENTS)]
    on_server = counted(server.algorithm)
    on_clients = [counted(c.algorithm) for c in clients]
    test = data(99)
    for round_idx in range(8):
        started = server.start_round()
        assert on_server[0] == round_idx + 1, "the server computes a round's layout once, when it starts it"
        uploads = []
        for index, client in enumerate(clients):
            client.receive(started.message(index))
            client.train(data(index), CPU, index)
            uploads.append((4, client.upload()))
        server.finish_round(uploads, test, CPU)
        assert on_server[0] == round_idx + 1, "checks, merge, test and ledger reuse the round's layout"
        assert [c[0] for c in on_clients] == [round_idx + 1] * CLIENTS, "each client rebuilds its side once"
    assert server.model.stage == 4 and len(server.state.ledger.rows) == 8


def test_equal_assignments_share_one_encoded_message_and_bytes_down_is_what_each_was_sent():
    config = RunConfig().replace(comm_round=4, client_num_in_total=CLIENTS, client_num_per_round=CLIENTS)
    server = build_server(config, make_model(), ClassificationTask())
    started = server.start_round()
    assert started.message(0) is started.message(1) is started.message(2) is started.wire  # encoded once
    assert started.assignment(0) is started.assignment(2)
    client = build_client(config, make_model(), ClassificationTask())
    uploads = []
    for index in range(CLIENTS):
        client.receive(started.message(index))
        client.train(data(index), CPU, index)
        uploads.append((4, client.upload()))
    server.finish_round(uploads)
    row = server.state.ledger.rows[0]
    assert row["bytes_down"] == CLIENTS * nbytes(started.wire)
    assert [c["bytes_down"] for c in server.state.ledger.per_client()] == [nbytes(started.message(i)) for i in range(3)]
    assert [c["train_samples"] for c in server.state.ledger.per_client()] == [4.0] * CLIENTS  # the header's own count


def test_the_finished_round_is_tested_before_the_next_one_grows_the_model():
    """No rewinding: the test after a stage's last round scores that stage's sub-model on the model as it trained."""
    config = RunConfig().replace(comm_round=4, client_num_in_total=1, client_num_per_round=1,
                                 progfed={"schedule": (1, 1, 1, 1)})
    server = build_server(config, make_model(), ClassificationTask())
    client = build_client(config, make_model(), ClassificationTask())
    started = server.start_round()
    client.receive(started.wire)
    client.train(data(0), CPU, 0)
    scored = []
    original = server.task.evaluate

    def evaluate(model, batches, device):
        scored.append((model.stage, server.model.stage))
        return original(model, batches, device)

    server.task.evaluate = evaluate
    server.finish_round([(4, client.upload())], data(7), CPU)
    assert scored == [(1, 1)], "round 0 (stage 1) is scored as stage 1, before round 1's growth"
    assert server.current is None and server.model.stage == 1  # finishing does not start the next round
    following = server.start_round()
    assert server.model.stage == 2 and following.plan.stage == 2
    assert Message.unpack(following.wire, "next").header.round == 1


def test_current_round_is_a_plain_attribute_and_reading_it_changes_nothing():
    config = RunConfig().replace(comm_round=4, client_num_in_total=1, client_num_per_round=1,
                                 progfed={"schedule": (1, 1, 1, 1)})
    server = build_server(config, make_model(), ClassificationTask())
    assert server.current is None and server.state.round == 0
    for _ in range(3):
        assert server.current is None  # no getter starts a round
    assert server.model.stage == 1 and server.state.ledger.rows == []


def test_a_client_that_holds_a_frozen_tensor_is_not_sent_it_and_one_that_does_not_is():
    """Warm-up freezes block 0: clients that received its current value keep it; a client that missed it gets it."""
    config = RunConfig().replace(comm_round=4, client_num_in_total=CLIENTS, client_num_per_round=CLIENTS,
                                 progfed={"schedule": (1, 1, 1, 1), "warmup_rounds": 1, "warmup_mode": "extra"})
    task = ClassificationTask()
    server = build_server(config, make_model(), task)
    clients = [build_client(config, make_model(), task) for _ in range(CLIENTS)]

    def answer(started, who):
        uploads = []
        for c in who:
            clients[c].receive(started.message(c))
            loaded, served = clients[c].model.state_dict(), server.model.state_dict()
            assert all(torch.equal(loaded[n], served[n]) for n in started.layout.sent)  # what it trains from
            clients[c].train(data(c), CPU, c)
            uploads.append((4, clients[c].upload()))
        server.finish_round(uploads)

    answer(server.start_round(), (0, 1, 2))  # round 0: stage 1, everybody
    growth = server.start_round()  # round 1: stage 2's warm-up; block 0 moved in round 0, so all get it
    assert growth.plan.warmup and all("blocks.0.0.weight" in growth.message(c) for c in range(CLIENTS))
    answer(growth, (0, 1))  # client 2 is not called this round
    ordinary = server.start_round()  # round 2: block 0 did not move during the warm-up
    assert not ordinary.plan.warmup
    held, missed = ordinary.message(0), ordinary.message(2)
    assert "blocks.0.0.weight" not in held and "blocks.0.0.weight" in missed
    assert "blocks.1.0.weight" in held  # trained in the warm-up: changed, so sent
    assert ordinary.message(0) is ordinary.message(1)  # equal holdings share one encoded message
    assert ordinary.bytes_to(0) < ordinary.bytes_to(2) == ordinary.full_message_bytes
    answer(ordinary, (0, 1, 2))  # each client rebuilt the server's sub-model, cached tensors included


def test_a_client_that_lost_what_it_held_is_refused_with_one_clear_error():
    config = RunConfig().replace(comm_round=4, client_num_in_total=1, client_num_per_round=1,
                                 progfed={"schedule": (1, 1, 1, 1), "warmup_rounds": 1, "warmup_mode": "extra"})
    task = ClassificationTask()
    server, client = build_server(config, make_model(), task), build_client(config, make_model(), task)
    for _ in range(2):
        started = server.start_round()
        client.receive(started.message(0))
        client.train(data(0), CPU, 0)
        server.finish_round([(4, client.upload())])
    restarted = build_client(config, make_model(), task)  # holds nothing
    with pytest.raises(InvalidUpdateError, match="never received them"):
        restarted.receive(server.start_round().message(0))
