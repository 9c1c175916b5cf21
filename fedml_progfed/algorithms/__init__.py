"""Federated algorithms over staged models, one module each, behind one registry.

``progfed_args.progfed_strategy`` names an entry: ``progfed`` (ProgFed, ICML 2022),
``e2e`` (the same algorithm with a single stage, the full model) and ``profl``
(ProFL, KDD 2025: progressive block training with freezing). A builder
takes ``(config, num_stages, task)`` and returns an
:class:`~fedml_progfed.algorithms.base.Algorithm`.
"""

from __future__ import annotations

from typing import Callable

from fedml_progfed.algorithms.base import Algorithm, ClientUpdate, Layout, LocalResult, RoundPlan, ServerState
from fedml_progfed.algorithms.profl import ProFL, effective_movement
from fedml_progfed.algorithms.progfed import ProgFed, build_end_to_end, build_progfed
from fedml_progfed.config.schema import RunConfig
from fedml_progfed.core.registry import Registry
from fedml_progfed.tasks.base import Task

Builder = Callable[[RunConfig, int, Task], Algorithm]
ALGORITHMS: Registry[Builder] = Registry("algorithm")
ALGORITHMS.add("progfed", build_progfed)
ALGORITHMS.add("e2e", build_end_to_end)
ALGORITHMS.add("profl", ProFL)


def build_algorithm(config: RunConfig, num_stages: int, task: Task) -> Algorithm:
    """The algorithm named by ``progfed_args.progfed_strategy``."""
    return ALGORITHMS.lookup(config.progfed.strategy, "progfed.strategy")(config, num_stages, task)


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "ClientUpdate",
    "Layout",
    "LocalResult",
    "ProFL",
    "ProgFed",
    "effective_movement",
    "RoundPlan",
    "ServerState",
    "build_algorithm",
]
