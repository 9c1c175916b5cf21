"""The framework-free engine of a run: the server and client ends around an algorithm.

:class:`~fedml_progfed.engine.server.Server` and
:class:`~fedml_progfed.engine.client.Client` do everything but the algorithm's
math (messages, codecs, checks, ledger, timing). The FedML adapters
(:mod:`fedml_progfed.fedml_plugin`) only translate FedML's calls into theirs.
"""

from __future__ import annotations

import logging
import secrets

from fedml_progfed.algorithms import build_algorithm
from fedml_progfed.config import key_of
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
from fedml_progfed.errors import FieldError
from fedml_progfed.privacy import ClientLevelDP, PrivacySettings, RecordLevelDP
from fedml_progfed.tasks.base import Task

log = logging.getLogger("fedml_progfed")


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
    state = algorithm.init_state(model)
    _refuse_running_statistics(config, model)
    if config.enable_dp and config.dp_solution_type == "sample":
        state.record_privacy = RecordLevelDP(config.noise_multiplier, config.delta, config.progfed.dp_accountant,
                                             target=config.epsilon)
    else:
        state.privacy = _privacy(config, model, algorithm.total_rounds)
    return Server(
        algorithm,
        state,
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
    # adaptive clipping moves the bound on the server each round; the server clips there
    client_level = config.enable_dp and config.dp_solution_type == "client" and config.progfed.dp_clip_quantile is None
    record_level = config.enable_dp and config.dp_solution_type == "sample"
    secret = None
    if record_level:
        seed = config.progfed.dp_noise_seed
        if seed is not None:
            log.warning("%s is set: every silo derives its DP-SGD noise from it, so whoever holds the config (the "
                        "server too) can remove the noise; set it only to reproduce a run", key_of("progfed.dp_noise_seed"))
        secret = seed if seed is not None else secrets.randbits(63)
    budget = (RecordLevelDP(config.noise_multiplier, config.delta, config.progfed.dp_accountant, target=config.epsilon)
              if record_level and config.epsilon is not None else None)
    return Client(_algorithm(config, model, task), model, WireSettings.from_config(config),
                  dropout=config.progfed.client_dropout, clip_norm=config.clipping_norm if client_level else None,
                  private_secret=secret, private_budget=budget)


def _refuse_running_statistics(config: RunConfig, model: StagedModel) -> None:
    """With DP, a model whose running statistics (BatchNorm) travel outside the clip is one error."""
    if not config.enable_dp:
        return
    parameters = {name for name, _ in model.named_parameters()}
    statistics = [name for name in model.state_dict() if name not in parameters]
    if statistics:
        raise FieldError("enable_dp", f"model {config.model} keeps running statistics ({', '.join(statistics[:2])}, ...) "
                                      f"computed from the clients' data outside the clip; use a model with group "
                                      f"norm (resnet18, resnet34_small) or none (convnet)")


def _privacy(config: RunConfig, model: StagedModel, rounds: int) -> ClientLevelDP | None:
    """The server's client-level DP, after the checks that need the model and the schedule.

    Refuses a model whose running statistics travel outside the clip, and (``progfed_dp_on_budget:
    refuse``) a schedule that would spend more than the target epsilon.
    """
    settings = PrivacySettings.from_config(config)
    if settings is None:
        return None
    if settings.clip_quantile is not None and settings.noise_multiplier == 0:
        raise FieldError("noise_multiplier", "0 with adaptive clipping: its noised count needs noise too; give a "
                                             "positive noise multiplier or leave {progfed.dp_clip_quantile} empty")
    if settings.clip_quantile is not None and not 2 * settings.count_noise > settings.noise_multiplier:
        raise FieldError("progfed.dp_count_noise", f"{settings.count_noise:g} leaves no noise for the update: adaptive "
                                                   f"clipping needs 2 x the count's noise above {{noise_multiplier}} "
                                                   f"({settings.noise_multiplier:g}); raise it or the participants")
    population = config.client_num_in_total
    if settings.delta >= 1 / population:
        log.warning("%s %g is at least 1 / %s (%g): a mechanism that publishes one client's update in the clear "
                    "meets it; use a delta well below 1 / %d", key_of("delta"), settings.delta,
                    key_of("client_num_in_total"), 1 / population, population)
    planned = settings.planned_epsilon(rounds, population)
    target = settings.target_epsilon
    if target is not None and planned > target and settings.on_budget == "refuse":
        raise FieldError(
            "epsilon",
            f"{rounds} rounds of this schedule spend epsilon {planned:.3f} at delta {settings.delta:g}, more than the "
            f"target {target:g}; at most {settings.largest_rounds(population, target)} rounds fit, or a "
            f"{{noise_multiplier}} of at least {settings.smallest_noise(rounds, population, target):.2f}, or set "
            f"{{progfed.dp_on_budget}}: stop to train until the target is reached",
        )
    log.info("client-level DP: %d rounds spend epsilon %.3f at delta %g (%s)", rounds, planned, settings.delta,
             settings.new_accountant().describe())
    return ClientLevelDP(settings)


__all__ = ["Client", "Round", "Server", "WireSettings", "build_client", "build_server", "stays_silent"]
