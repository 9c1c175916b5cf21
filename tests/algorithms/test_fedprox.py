"""The client's FedProx term against a hand-computed two-step example (Li et al. 2020)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedml_progfed.comm.messages import Message
from fedml_progfed.config import ProgFedConfig, RunConfig
from fedml_progfed.core.staged_model import SequentialStagedModel
from fedml_progfed.engine import build_client, build_server
from round_steps import aggregate, broadcast


class MSETask:
    """A one-off task (any object with the Task members will do): squared error; never evaluated here."""

    name = "regression"
    metric_name = "neg_mse"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)

    def example_batch(self, input_shape, num_classes, batch_size):
        return torch.zeros(batch_size, *input_shape), torch.zeros(batch_size, num_classes)

    def evaluate(self, model, batches, device) -> dict[str, float]:
        raise AssertionError("train() must not evaluate")


MSE = MSETask()


def one_weight_model() -> SequentialStagedModel:
    model = SequentialStagedModel([nn.Flatten()], nn.Linear(2, 1, bias=False), (2,), 1)
    with torch.no_grad():
        model.heads[0].weight.copy_(torch.tensor([[0.5, 0.0]]))
    return model


def train_two_steps(optimizer: str, mu: float) -> torch.Tensor:
    config = RunConfig(
        epochs=2, learning_rate=0.1, comm_round=1, client_num_in_total=1, client_num_per_round=1,
        progfed=ProgFedConfig(strategy="e2e", optimizer=optimizer, fedprox_mu=mu),
    )
    server, client = build_server(config, one_weight_model(), MSE), build_client(config, one_weight_model(), MSE)
    client.receive(broadcast(server))
    data = [(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0]]))]
    client.train(data, torch.device("cpu"), 0)
    message = Message.unpack(client.upload(), "upload")
    assert message.header.plan["stage"] == 1 and message.header.round == 0 and message.header.metrics["flops"] > 0
    return 0.5 + message.tensors["heads.0.weight"]  # the upload is the change from w0 = 0.5


def test_fedprox_two_steps_by_hand():
    # step 1 at w = w0: grad = 2(0.5-1) = -1, prox 0            -> w = 0.6
    # step 2: grad = 2(0.6-1) = -0.8, prox = mu (0.6-0.5) = 0.1  -> w = 0.6 + 0.1*0.7 = 0.67
    assert train_two_steps("fedprox", mu=1.0)[0, 0].item() == pytest.approx(0.67, abs=1e-6)
    # FedAvg has no proximal term: w = 0.6 + 0.1*0.8 = 0.68
    assert train_two_steps("fedavg", mu=1.0)[0, 0].item() == pytest.approx(0.68, abs=1e-6)
