"""``ProgFedServerAggregator``: FedML's ServerAggregator, translating FedML's calls to the engine's server.

FedML's cross-silo server calls, per round (FEDML_NOTES): ``on_before_aggregation``
-> ``aggregate`` -> ``on_after_aggregation`` -> ``set_model_params`` ->
``test_all`` / ``test``, and sends what ``aggregate`` returned to the next
round's clients. Each maps to one call of :class:`fedml_progfed.engine.server.Server`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, List, Tuple

from fedml.core import ServerAggregator

from fedml_progfed.config.schema import RunConfig
from fedml_progfed.core.staged_model import StagedModel
from fedml_progfed.engine import build_server
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.tasks.base import Task
from fedml_progfed.tasks.classification import ClassificationTask


class ProgFedServerAggregator(ServerAggregator):
    """A FedML server aggregator running the configured algorithm (ProgFed, e2e, ...).

    Parameters
    ----------
    model
        The global staged model, seeded with the run seed.
    args
        FedML's flattened arguments (kept for FedML's base class).
    config
        The validated run configuration.
    task
        Loss and metric; classification by default.
    """

    def __init__(self, model: StagedModel, args: Any, config: RunConfig, task: Task | None = None) -> None:
        super().__init__(model, args)
        self.server = build_server(config, model, task or ClassificationTask())

    def get_model_params(self) -> "OrderedDict":
        """The broadcast of the upcoming round (FedML sends it to every sampled client)."""
        return self.server.broadcast()

    def set_model_params(self, model_parameters) -> None:
        """FedML hands back what ``aggregate`` returned: the server model is that already."""
        if not self.server.is_current_broadcast(model_parameters):
            raise InvalidUpdateError(
                "the global model changes only through aggregate(); set_model_params got a foreign message"
            )

    def aggregate(self, raw_client_model_or_grad_list: List[Tuple[float, OrderedDict]]) -> "OrderedDict":
        """Check, aggregate and record the round; returns the next round's broadcast."""
        return self.server.aggregate(raw_client_model_or_grad_list)

    def test(self, test_data, device, args) -> dict[str, float]:
        """End of a round: the server tests on its own test rounds and writes its round files.

        The cross-silo entry asks FedML to call this every round (frequency 1), so the
        server, not FedML's round counter, decides which rounds are tested.
        """
        return self.server.end_round(test_data, device)

    def test_all(self, train_data_local_dict, test_data_local_dict, device, args) -> bool:
        """Per-client evaluation is not part of ProgFed's protocol; the global test set is used."""
        return False
