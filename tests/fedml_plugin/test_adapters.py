"""The FedML pair only translates: each FedML call maps to one engine call.

The adapters are checked against FedML's real base classes and against the
framework-free engine itself: a round driven through FedML's calls must give
bit for bit what the same round gives through :func:`build_client` /
:func:`build_server`, so an adapter that trained, merged or rewrote anything on
its own would show up as a difference.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fedml.core import ClientTrainer, ServerAggregator

from fedml_progfed.comm.messages import METRICS_KEY, Message
from fedml_progfed.config import RunConfig
from fedml_progfed.core.staged_model import initialize
from fedml_progfed.data import TensorBatches
from fedml_progfed.engine import build_client, build_server
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.fedml_plugin import ProgFedClientTrainer, ProgFedServerAggregator
from fedml_progfed.models import build_model
from fedml_progfed.tasks.classification import ClassificationTask
from round_steps import aggregate, broadcast

CONFIG = RunConfig().replace(comm_round=4, client_num_in_total=4, client_num_per_round=2, learning_rate=0.1)
CPU = torch.device("cpu")


def make_model():
    return initialize(build_model("convnet", (1, 28, 28), 10, 4), 0)


def pair(config: RunConfig = CONFIG):
    """A trainer and an aggregator; the aggregator tests on ``server_test_data()`` inside aggregate, as in a run."""
    args = SimpleNamespace()
    return (ProgFedClientTrainer(make_model(), args, config),
            ProgFedServerAggregator(make_model(), args, config, test_data=server_test_data(), device=CPU))


def server_test_data() -> TensorBatches:
    """The server's test data: nine samples of a silo no client trains on."""
    return loader(9)


def loader(client: int) -> TensorBatches:
    """Six samples of silo ``client`` (different per silo), in batches of three."""
    g = torch.Generator().manual_seed(client)
    return TensorBatches(torch.randn(6, 1, 28, 28, generator=g), torch.randint(0, 10, (6,), generator=g), 3, True, client)


def tensors(wire) -> dict[str, torch.Tensor]:
    """A wire message's tensors, without the measurements (they hold a wall-clock time)."""
    return {k: v for k, v in wire.items() if k != METRICS_KEY}


def assert_same_wire(a, b) -> None:
    assert list(tensors(a)) == list(tensors(b))
    for name, value in tensors(a).items():
        assert torch.equal(value, tensors(b)[name]), name


def fedml_round(trainer: ProgFedClientTrainer, aggregator: ProgFedServerAggregator, silos=(2, 3)):
    """One round in FedML's call order (FEDML_NOTES); returns the uploads and what aggregate returned."""
    broadcast = aggregator.get_model_params()
    uploads = []
    for silo in silos:
        data = loader(silo)
        trainer.update_dataset(data, data, len(data.dataset))
        trainer.set_model_params(broadcast)
        trainer.on_before_local_training(data, CPU, trainer.args)
        trainer.train(data, CPU, trainer.args)
        trainer.on_after_local_training(data, CPU, trainer.args)
        uploads.append((len(data.dataset), trainer.get_model_params()))
    updates, _ = aggregator.on_before_aggregation(uploads)
    following = aggregator.on_after_aggregation(aggregator.aggregate(updates))
    aggregator.set_model_params(following)  # FedML hands back what aggregate returned
    return uploads, following


@pytest.mark.parametrize(
    "adapter,base,hooks",
    [
        (ProgFedClientTrainer, ClientTrainer, ("on_before_local_training", "on_after_local_training")),
        (ProgFedServerAggregator, ServerAggregator, ("on_before_aggregation", "on_after_aggregation")),
    ],
)
def test_adapters_are_fedml_classes_and_keep_fedml_hooks(adapter, base, hooks):
    """FedML's runtime calls them as its own; its DP/FHE/defence hooks stay FedML's (not replaced)."""
    assert issubclass(adapter, base)
    for hook in hooks:
        assert getattr(adapter, hook) is getattr(base, hook), hook
    trainer, aggregator = pair()
    instance = trainer if adapter is ProgFedClientTrainer else aggregator
    assert isinstance(instance, base)
    # FedML's base __init__ ran: the model FedML sees is the one the engine trains or serves.
    assert instance.id == 0 and isinstance(instance.args, SimpleNamespace)
    engine_model = trainer.client.model if instance is trainer else aggregator.server.model
    assert instance.model is engine_model


def test_a_fedml_round_gives_exactly_what_the_engine_gives():
    """Uploads, the next broadcast and the ledger row equal a round run on the bare engine."""
    trainer, aggregator = pair()
    uploads, following = fedml_round(trainer, aggregator)

    task = ClassificationTask()
    client, server = build_client(CONFIG, make_model(), task), build_server(CONFIG, make_model(), task)
    message, expected = broadcast(server), []
    for silo in (2, 3):
        client.receive(message)
        client.train(loader(silo), CPU, silo)
        expected.append((6, client.upload()))
    engine_following = aggregate(server, expected, server_test_data(), CPU)

    for (_, got), (_, want) in zip(uploads, expected):
        assert_same_wire(got, want)
        assert Message.unpack(got, "upload").header.metrics["samples"] == 6
    assert_same_wire(following, engine_following)
    for name, value in server.model.state_dict().items():
        assert torch.equal(aggregator.model.state_dict()[name], value), name
    (row,), (engine_row,) = aggregator.server.state.ledger.rows, server.state.ledger.rows
    for column in ("round", "stage", "bytes_down", "bytes_up", "client_flops", "train_loss", "num_clients"):
        assert row[column] == engine_row[column], column
    assert [c["client"] for c in aggregator.server.state.ledger.per_client()] == [2, 3]


def test_set_get_model_params_and_train_round_trip_through_the_trainer_model():
    """set_model_params loads the broadcast into FedML's model, train trains it, get_model_params is the change."""
    trainer, aggregator = pair()
    broadcast = aggregator.get_model_params()
    sent = Message.unpack(broadcast, "broadcast").tensors
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)  # the trainer's model is off; the broadcast must overwrite it
    trainer.set_model_params(broadcast)
    state = trainer.model.state_dict()
    assert sent and all(torch.equal(state[n], v) for n, v in sent.items())

    data = loader(1)
    trainer.update_dataset(data, data, 6)
    trainer.train(data, CPU, None)
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    upload = Message.unpack(trainer.get_model_params(), "upload")
    assert upload.header.type == "update" and upload.header.kind == "delta" and upload.header.client == 1
    assert upload.tensors
    moved = 0
    for name, delta in upload.tensors.items():
        assert torch.allclose(sent[name] + delta, trained[name], atol=1e-6), name
        moved += int(delta.abs().max() > 0)
    assert moved > 0  # train() really trained the model FedML holds


def test_client_id_comes_from_the_loader_else_from_fedml():
    trainer, aggregator = pair()
    broadcast = aggregator.get_model_params()
    trainer.update_dataset(loader(3), loader(3), 6)
    assert trainer.client_index == 3
    trainer.set_model_params(broadcast)
    trainer.train(loader(3), CPU, None)
    assert Message.unpack(trainer.get_model_params(), "upload").header.client == 3

    plain = list(loader(2))  # a FedML-style loader with no client_index
    trainer.set_id(1)
    trainer.update_dataset(plain, plain, 6)
    assert trainer.client_index == 1
    trainer.set_model_params(broadcast)
    trainer.train(plain, CPU, None)
    assert Message.unpack(trainer.get_model_params(), "upload").header.client == 1


def test_foreign_messages_are_refused_on_both_sides():
    trainer, aggregator = pair()
    plain_state = make_model().state_dict()  # what FedML's own trainers exchange
    with pytest.raises(InvalidUpdateError, match="no fedml_progfed header"):
        trainer.set_model_params(plain_state)
    with pytest.raises(InvalidUpdateError, match="only through aggregate"):
        aggregator.set_model_params(plain_state)
    before = {k: v.clone() for k, v in aggregator.model.state_dict().items()}
    first = aggregator.get_model_params()
    aggregator.set_model_params(first)  # the current broadcast: accepted, and nothing changes
    for name, value in aggregator.model.state_dict().items():
        assert torch.equal(value, before[name]), name

    fedml_round(trainer, aggregator)
    with pytest.raises(InvalidUpdateError, match="only through aggregate"):
        aggregator.set_model_params(first)  # last round's broadcast is foreign now
    copy = {k: v.clone() for k, v in aggregator.get_model_params().items()}
    with pytest.raises(InvalidUpdateError, match="only through aggregate"):
        aggregator.set_model_params(copy)  # equal values, but not the message aggregate returned


def test_aggregate_returns_the_servers_next_broadcast():
    trainer, aggregator = pair()
    first = aggregator.get_model_params()
    _, following = fedml_round(trainer, aggregator)
    assert following is aggregator.get_model_params()
    header = Message.unpack(following, "next").header
    assert header.type == "broadcast" and header.round == 1 and aggregator.server.state.round == 1
    values = Message.unpack(following, "next").tensors
    state = aggregator.model.state_dict()
    assert all(torch.equal(state[n], v) for n, v in values.items())  # the merged model, as values
    kept = [n for n in values if n in first]  # the model may have grown: compare what both carry
    assert kept and any(not torch.equal(values[n], first[n]) for n in kept)  # round 0's updates were merged


def test_test_and_test_all_are_the_servers_and_tasks():
    trainer, aggregator = pair()
    test_data = loader(9)
    assert aggregator.test(test_data, CPU, None) == {}  # no round finished yet: nothing to test
    fedml_round(trainer, aggregator)
    scores = aggregator.test(test_data, CPU, None)
    row = aggregator.server.state.ledger.rows[-1]
    assert scores["test_metric"] == row["test_metric"] and scores["test_loss"] == row["test_loss"]
    assert aggregator.test_all({}, {}, CPU, None) is False
    local = trainer.test(test_data, CPU, None)  # the trainer's own model, as the task scores it
    assert local == pytest.approx(ClassificationTask().evaluate(trainer.model, test_data, CPU), rel=1e-5)
    assert local != pytest.approx(ClassificationTask().evaluate(aggregator.model, test_data, CPU), rel=1e-5)
