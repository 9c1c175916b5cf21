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
from fedml_progfed.core.budgets import parse_budgets
from fedml_progfed.engine.checks import UpdatePolicy
from fedml_progfed.engine.client import Client
from fedml_progfed.engine.dropout import stays_silent
from fedml_progfed.engine.memory import MemoryPlanner, MemorySettings
from fedml_progfed.engine.round import Round
from fedml_progfed.engine.server import Server
from fedml_progfed.engine.settings import WireSettings
from fedml_progfed.tasks.base import Task


def _algorithm(config: RunConfig, model: StagedModel, task: Task):
    algorithm = build_algorithm(config, model.num_stages, task)
    algorithm.prepare_model(model)
    return algorithm


def build_server(config: RunConfig, model: StagedModel, task: Task) -> Server:
    """The server end: the configured algorithm, its initial state around ``model``, codecs, memory planning.

    ``model`` comes from :func:`fedml_progfed.models.build_model` (it knows its input shape).
    """
    algorithm = _algorithm(config, model, task)
    budgets = config.memory.budgets
    memory = MemorySettings(
        sample=task.example_batch(tuple(model.input_shape), model.num_classes, config.batch_size),
        device=next(model.parameters()).device,
        momentum=config.momentum,
        budgets=parse_budgets(budgets) if budgets else None,
        estimator=config.memory.estimator,
        seed=config.random_seed,
    )
    return Server(
        algorithm,
        algorithm.init_state(model),
        task,
        WireSettings.from_config(config),
        num_clients=config.client_num_in_total,
        policy=UpdatePolicy.from_config(config),
        memory=MemoryPlanner(algorithm, memory, config.client_num_in_total),
        per_round=config.client_num_per_round,
        test_every=config.frequency_of_the_test,
        diagnostics=config.progfed.diagnostics,
    )


def build_client(config: RunConfig, model: StagedModel, task: Task) -> Client:
    """A client end: the same algorithm and codecs around a local ``model``."""
    return Client(_algorithm(config, model, task), model, WireSettings.from_config(config),
                  dropout=config.progfed.client_dropout)


__all__ = ["Client", "Round", "Server", "WireSettings", "build_client", "build_server", "stays_silent"]
