"""``ProgFedClientTrainer``: FedML's ClientTrainer, translating FedML's calls to the engine's client.

FedML's cross-silo client calls, per round (FEDML_NOTES): ``update_dataset`` ->
``set_model_params`` -> ``on_before_local_training`` -> ``train`` ->
``on_after_local_training`` -> ``get_model_params``. Each maps to one call of
:class:`fedml_progfed.engine.client.Client`; nothing else happens here.
"""

from __future__ import annotations

from typing import Any

from fedml.core import ClientTrainer

from fedml_progfed.config.schema import RunConfig
from fedml_progfed.core.staged_model import StagedModel
from fedml_progfed.engine import build_client
from fedml_progfed.fedml_plugin.fedml_dp import fedml_dp_off
from fedml_progfed.tasks.base import Task
from fedml_progfed.tasks.classification import ClassificationTask


class ProgFedClientTrainer(ClientTrainer):
    """A FedML client trainer running the configured algorithm (ProgFed, e2e, ...).

    Parameters
    ----------
    model
        A staged model built (and seeded) like the server's.
    args
        FedML's flattened arguments (kept for FedML's base class).
    config
        The validated run configuration.
    task
        Loss and metric; classification by default.
    """

    def __init__(self, model: StagedModel, args: Any, config: RunConfig, task: Task | None = None) -> None:
        with fedml_dp_off(args):  # the engine does DP; FedML's frames must not
            super().__init__(model, args)
        self.client = build_client(config, model, task or ClassificationTask())
        self.client_index: int | None = None

    def update_dataset(self, local_train_dataset, local_test_dataset, local_sample_number) -> None:
        """FedML hands over a silo's data; our loaders say whose (``client_index``), else FedML's id."""
        super().update_dataset(local_train_dataset, local_test_dataset, local_sample_number)
        index = getattr(local_train_dataset, "client_index", None)
        self.client_index = self.id if index is None else int(index)

    def set_model_params(self, model_parameters) -> None:
        self.client.receive(model_parameters)

    def train(self, train_data, device, args) -> None:
        index = getattr(train_data, "client_index", None)
        self.client.train(train_data, device, self.client_index if index is None else int(index))

    def get_model_params(self):
        return self.client.upload()

    def test(self, test_data, device, args) -> dict[str, float]:
        """Local evaluation (FedML calls it only when ``test_on_clients`` asks for it)."""
        return self.client.algorithm.task.evaluate(self.model, test_data, device)
