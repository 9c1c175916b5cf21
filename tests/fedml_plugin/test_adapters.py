"""The FedML pair only translates: each FedML call maps to one engine call."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from fedml_progfed.comm.messages import Message
from fedml_progfed.config import RunConfig
from fedml_progfed.core.staged_model import initialize
from fedml_progfed.data import TensorBatches
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.fedml_plugin import ProgFedClientTrainer, ProgFedServerAggregator, aggregator, trainer
from fedml_progfed.models import build_model

CONFIG = RunConfig().replace(comm_round=4, client_num_in_total=4, client_num_per_round=2)


def pair():
    make = lambda: initialize(build_model("convnet", (1, 28, 28), 10, 4), 0)  # noqa: E731
    return ProgFedClientTrainer(make(), SimpleNamespace(), CONFIG), ProgFedServerAggregator(make(), SimpleNamespace(), CONFIG)


def loader(client: int) -> TensorBatches:
    g = torch.Generator().manual_seed(client)
    return TensorBatches(torch.randn(6, 1, 28, 28, generator=g), torch.randint(0, 10, (6,), generator=g), 3, True, client)


def test_a_round_through_the_fedml_calls_and_the_client_id_comes_from_update_dataset():
    client, server = pair()
    broadcast = server.get_model_params()
    uploads = []
    for silo in (2, 3):
        data = loader(silo)
        client.update_dataset(data, data, 6)
        assert client.client_index == silo
        client.set_model_params(broadcast)
        client.train(data, torch.device("cpu"), None)
        message = client.get_model_params()
        assert Message.unpack(message, "upload").header.client == silo
        uploads.append((6, message))
    updates, _ = server.on_before_aggregation(uploads)
    following = server.on_after_aggregation(server.aggregate(updates))
    server.set_model_params(following)  # FedML hands back what aggregate returned: accepted, nothing to do
    assert Message.unpack(following, "next").header.round == 1
    assert [c["client"] for c in server.server.state.ledger.per_client()] == [2, 3]
    with pytest.raises(InvalidUpdateError, match="only through aggregate"):
        server.set_model_params(broadcast)


@pytest.mark.parametrize("module", [trainer, aggregator])
def test_adapters_stay_thin(module):
    assert len(inspect.getsource(module).splitlines()) <= 150
