"""The framework-free engine of a run: the server and client ends around an algorithm.

:class:`~fedml_progfed.engine.server.Server` and
:class:`~fedml_progfed.engine.client.Client` do everything but the algorithm's
math (messages, codecs, checks, ledger, timing). The FedML adapters
(:mod:`fedml_progfed.fedml_plugin`) only translate FedML's calls into theirs.
"""

from __future__ import annotations

from fedml_progfed.algorithms import build_algorithm
from fedml_progfed.config.schema import RunConfig
from fedml_progfed.core.staged_model import StagedModel
from fedml_progfed.engine.client import Client
from fedml_progfed.engine.server import Server
from fedml_progfed.engine.settings import WireSettings
from fedml_progfed.tasks.base import Task


def build_server(config: RunConfig, model: StagedModel, task: Task) -> Server:
    """The server end: the configured algorithm, its initial state around ``model``, codecs."""
    algorithm = build_algorithm(config, model.num_stages, task)
    return Server(
        algorithm,
        algorithm.init_state(model),
        task,
        WireSettings.from_config(config),
        num_clients=config.client_num_in_total,
        aggregation_weights=config.progfed.aggregation_weights,
    )


def build_client(config: RunConfig, model: StagedModel, task: Task) -> Client:
    """A client end: the same algorithm and codecs around a local ``model``."""
    return Client(build_algorithm(config, model.num_stages, task), model, WireSettings.from_config(config))


__all__ = ["Client", "Server", "WireSettings", "build_client", "build_server"]
