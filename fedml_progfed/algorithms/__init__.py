"""Federated algorithms over staged models, one module each, behind one registry.

The ``progfed.strategy`` field names an entry: ``progfed`` (ProgFed, ICML 2022),
``e2e`` (the same algorithm with a single stage, the full model), ``profl``
(ProFL, KDD 2025: progressive block training with freezing) and the baselines of
memory-heterogeneous FL: ``depthfl`` (DepthFL, ICLR 2023), ``heterofl`` (HeteroFL,
ICLR 2021) and ``allsmall`` (everyone trains the width every client fits). Each entry takes
its own section's dataclass and the shared :class:`TrainingSettings`; this module
is where a :class:`~fedml_progfed.config.schema.RunConfig` is split into them.
"""

from __future__ import annotations

from typing import Callable

from fedml_progfed.algorithms.base import (
    Algorithm, Assignment, ClientUpdate, Layout, LocalResult, RoundPlan, ServerState, TrainingSettings,
)
from fedml_progfed.algorithms.allsmall import AllSmall
from fedml_progfed.algorithms.depthfl import DepthFL
from fedml_progfed.algorithms.heterofl import HeteroFL
from fedml_progfed.algorithms.profl import ProFL, ProFLState, effective_movement
from fedml_progfed.algorithms.progfed import ProgFed, build_end_to_end, build_progfed
from fedml_progfed.config.schema import RunConfig
from fedml_progfed.core.local_sgd import SGDSettings
from fedml_progfed.core.private_sgd import PrivateSGDSettings
from fedml_progfed.core.registry import Registry
from fedml_progfed.core.server_optim import ServerOptimizerSettings
from fedml_progfed.tasks.base import Task

Builder = Callable[[RunConfig, TrainingSettings, int, Task], Algorithm]
ALGORITHMS: Registry[Builder] = Registry("algorithm")
ALGORITHMS.add("progfed", lambda config, training, stages, task: build_progfed(config.progfed, training, stages, task))
ALGORITHMS.add("e2e", lambda config, training, stages, task: build_end_to_end(config.progfed, training, stages, task))
ALGORITHMS.add("profl", lambda config, training, stages, task: ProFL(config.profl, training, stages, task))
ALGORITHMS.add("depthfl", lambda config, training, stages, task: DepthFL(config.depthfl, training, stages, task))
ALGORITHMS.add("heterofl", lambda config, training, stages, task: HeteroFL(config.width, training, stages, task))
ALGORITHMS.add("allsmall", lambda config, training, stages, task: AllSmall(config.width, training, stages, task))


def training_settings(config: RunConfig) -> TrainingSettings:
    """The shared training settings of a run (FedML's ``train_args``, the seed, the lr decay, the server step)."""
    p = config.progfed
    server = ServerOptimizerSettings(
        optimizer=p.optimizer, lr=p.resolved_server_lr, beta1=p.fedadam_beta1, beta2=p.fedadam_beta2,
        tau=p.fedadam_tau, reset_on_growth=p.fedadam_reset_on_growth,
    )
    sgd = SGDSettings(lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay,
                      epochs=config.epochs)
    private = (PrivateSGDSettings(clip=config.clipping_norm, noise_multiplier=config.noise_multiplier)
               if config.enable_dp and config.dp_solution_type == "sample" else None)
    return TrainingSettings(
        rounds=config.comm_round, sgd=sgd, seed=config.random_seed, lr_schedule=p.lr_schedule, lr_min=p.lr_min,
        lr_restart_at_growth=p.lr_restart_at_growth, server=server, private=private,
    )


def build_algorithm(config: RunConfig, num_stages: int, task: Task) -> Algorithm:
    """The algorithm named by ``progfed.strategy``, given its own settings."""
    return ALGORITHMS.lookup(config.progfed.strategy, "progfed.strategy")(config, training_settings(config), num_stages, task)


__all__ = [
    "ALGORITHMS",
    "AllSmall",
    "Algorithm",
    "Assignment",
    "ClientUpdate",
    "DepthFL",
    "HeteroFL",
    "Layout",
    "LocalResult",
    "ProFL",
    "ProFLState",
    "ProgFed",
    "effective_movement",
    "RoundPlan",
    "ServerState",
    "TrainingSettings",
    "build_algorithm",
    "training_settings",
]
