"""``ProgFedServerAggregator``: FedML's ServerAggregator, translating FedML's calls to the engine's server.

FedML's cross-silo server calls, per round (FEDML_NOTES): ``on_before_aggregation``
-> ``aggregate`` -> ``on_after_aggregation`` -> ``set_model_params`` ->
``test_all`` / ``test``, and sends what ``aggregate`` returned to the next
round's clients. The engine's server works in two halves; this adapter chains them:
FedML's first ``get_model_params`` starts round 0, and ``aggregate`` finishes a round
(checks, merge, the test of the model that round trained, its metrics row) and
starts the next, whose messages it returns. ``test`` hands back the finished
round's scores.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, List, Tuple

from fedml.core import ServerAggregator

from fedml_progfed.config.schema import RunConfig
from fedml_progfed.core.staged_model import StagedModel
from fedml_progfed.engine import build_server
from fedml_progfed.engine.sampling import sample_clients
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.fedml_plugin.fedml_dp import fedml_dp_off
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

    def __init__(
        self, model: StagedModel, args: Any, config: RunConfig, task: Task | None = None, test_data: Any = None,
        device: Any = None,
    ) -> None:
        with fedml_dp_off(args):  # the engine does DP; FedML's frames must not
            super().__init__(model, args)
        self.server = build_server(config, model, task or ClassificationTask())
        # The server tests each round's model inside aggregate, before the next round grows it.
        self.test_data = test_data
        self.device = device

    def data_silo_selection(self, round_idx: int, client_num_in_total: int, client_num_per_round: int) -> list[int]:
        """The silos of the round about to be sent, by the engine's round, not FedML's counter.

        FedML's counter restarts at 0 when a job resumes; the engine's round comes from the
        checkpoint, so a resumed job trains the silos the uninterrupted run would have
        (:func:`~fedml_progfed.engine.sampling.sample_clients`, as standalone runs do).
        """
        current = self.server.current or self.server.start_round()
        return sample_clients(current.plan.round, client_num_in_total, client_num_per_round)

    def get_model_params(self) -> "OrderedDict":
        """The upcoming round's messages; FedML's first call (its initial model) starts round 0."""
        current = self.server.current or self.server.start_round()
        return current.wire

    def set_model_params(self, model_parameters) -> None:
        """FedML hands back what ``aggregate`` returned: the server model is that already."""
        current = self.server.current
        if current is None or model_parameters is not current.wire:
            raise InvalidUpdateError(
                "the global model changes only through aggregate(); set_model_params got a foreign message"
            )

    def aggregate(self, raw_client_model_or_grad_list: List[Tuple[float, OrderedDict]]) -> "OrderedDict":
        """Finish the round (check, merge, test, record) and start the next; returns its messages."""
        self.server.finish_round(raw_client_model_or_grad_list, self.test_data, self.device)
        return self.server.start_round().wire

    def test(self, test_data, device, args) -> dict[str, float]:
        """The finished round's test scores (the server tested inside ``aggregate``, on its own test rounds)."""
        return self.server.last_scores

    def test_all(self, train_data_local_dict, test_data_local_dict, device, args) -> bool:
        """Per-client evaluation is not part of ProgFed's protocol; the global test set is used."""
        return False
