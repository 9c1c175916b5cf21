"""Thin FedML adapters: ``ProgFedClientTrainer`` and ``ProgFedServerAggregator``."""

from fedml_progfed.fedml_plugin.aggregator import ProgFedServerAggregator
from fedml_progfed.fedml_plugin.trainer import ProgFedClientTrainer

__all__ = ["ProgFedClientTrainer", "ProgFedServerAggregator"]
