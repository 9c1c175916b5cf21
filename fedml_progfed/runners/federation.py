"""Everything one run needs, built once from the validated config: data, models, the FedML pair, the device.

Shared by the standalone loop and the FedML entry (``main.py``), so both runtimes
build identical models, data partitions and pairs from the same config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from fedml_progfed.config import RunConfig, fedml_namespace
from fedml_progfed.core.staged_model import StagedModel, initialize
from fedml_progfed.data import FederatedData
from fedml_progfed.data.registry import load_federated_data, task_for
from fedml_progfed.fedml_plugin import ProgFedClientTrainer, ProgFedServerAggregator
from fedml_progfed.models import build_model, default_stages
from fedml_progfed.runners.placement import resolve_device

log = logging.getLogger("fedml_progfed")


def build_model_for(config: RunConfig, data: FederatedData) -> StagedModel:
    """The staged model named by ``model_args.model``, seeded with ``common_args.random_seed``."""
    return build_model_for_shape(config, data.input_shape, data.num_classes)


def build_model_for_shape(config: RunConfig, input_shape: tuple[int, ...], num_classes: int) -> StagedModel:
    """:func:`build_model_for` from the input shape and class count alone (no data needed)."""
    stages = config.progfed.stages or default_stages(config.model)
    model = build_model(config.model, tuple(input_shape), num_classes, stages, **config.model_options())
    return initialize(model, config.random_seed)


@dataclass
class Federation:
    """Everything one run needs: data, the pair, the device and FedML-style args."""

    config: RunConfig
    data: FederatedData
    trainer: ProgFedClientTrainer
    aggregator: ProgFedServerAggregator
    device: torch.device
    args: Any

    @property
    def server(self):
        """The engine's server inside the aggregator (state, ledger, algorithm)."""
        return self.aggregator.server

    @property
    def total_rounds(self) -> int:
        return self.server.algorithm.total_rounds


def _rank_and_world(config: RunConfig, args: Any) -> tuple[int, int]:
    """This process's rank and the process count: 0 of 1 standalone, server + clients in cross-silo."""
    if config.training_type != "cross_silo":
        return 0, 1
    return int(getattr(args, "rank", 0) or 0), config.client_num_per_round + 1


def build_federation(
    config: RunConfig, sections: dict, data: FederatedData | None = None, args: Any = None
) -> Federation:
    """Build data (unless given), two identically seeded models and the trainer/aggregator pair.

    ``args`` is FedML's argument object when FedML drives the run; the standalone
    loop passes none and gets a flat namespace of the same keys. Building the pair
    checks the schedule, codecs and strategy against the model: errors come before
    any training.
    """
    data = data or load_federated_data(config)
    args = args if args is not None else fedml_namespace(sections)
    device = resolve_device(config, *_rank_and_world(config, args))
    args.device = device
    task = task_for(config, data)
    aggregator = ProgFedServerAggregator(
        build_model_for(config, data).to(device), args, config, task, test_data=data.test_global, device=device
    )
    trainer = ProgFedClientTrainer(build_model_for(config, data), args, config, task)
    return Federation(config, data, trainer, aggregator, device, args)
