"""The standalone simulator: one process drives the FedML pair in cross-silo order.

FedML's ``backend: sp`` builds its own FedAvgAPI and ignores custom trainers and
aggregators (FEDML_NOTES), so this loop replaces it. It calls the pair exactly
as FedML's cross-silo runtime does (``CLIENT_CALL_ORDER`` / ``SERVER_CALL_ORDER``,
read off ``cross_silo/client/fedml_trainer.py`` and
``cross_silo/server/fedml_aggregator.py``) and samples clients with the rule
of :mod:`fedml_progfed.engine.sampling`, which the cross-silo server uses too, so
the same seed gives the same clients and the same weights in every runtime.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from fedml_progfed.engine.sampling import sample_clients
from fedml_progfed.runners.federation import Federation

log = logging.getLogger("fedml_progfed")

CLIENT_CALL_ORDER = ("set_model_params", "on_before_local_training", "train", "on_after_local_training", "get_model_params")
SERVER_CALL_ORDER = ("on_before_aggregation", "aggregate", "on_after_aggregation", "set_model_params")
SERVER_TEST_ORDER = ("test_all", "test")


def called_clients(fed: Federation, round_idx: int) -> list[int]:
    """The silos a round calls: FedML's sample, or the plan's participants when memory budgets choose them.

    With budgets and every client called each round (the cross-silo shape) FedML's
    sample is everyone and non-participants answer with a skip, as they do under
    ``mpirun``; with fewer clients per round the participants are sampled among those
    that fit, and only they are called.
    """
    config = fed.config
    chosen = fed.server.current.participants
    if chosen is not None and config.client_num_per_round < config.client_num_in_total:
        return list(chosen)
    return sample_clients(round_idx, config.client_num_in_total, config.client_num_per_round)


def run_rounds(fed: Federation, on_round: Callable[[dict], None] | None = None) -> list[dict]:
    """Drive the pair for ``comm_round`` rounds in FedML's cross-silo call order; returns the ledger rows.

    The first ``get_model_params`` starts round 0 (or a restored run's next round); each
    ``aggregate`` finishes a round and starts the next, as under FedML's cross-silo server.
    """
    config, trainer, aggregator, device, args = fed.config, fed.trainer, fed.aggregator, fed.device, fed.args
    (_, _, _, test_global, train_num, train_local, test_local, _) = fed.data.fedml_dataset
    broadcast = aggregator.get_model_params()
    while not fed.server.finished:  # from round 0, or from a restored checkpoint's round
        round_idx = fed.server.state.round
        uploads = []
        for client in called_clients(fed, round_idx):
            trainer.update_dataset(train_local[client], test_local[client], train_num[client])
            trainer.set_model_params(broadcast[client] if type(broadcast) is dict else broadcast)
            trainer.on_before_local_training(train_local[client], device, args)
            trainer.train(train_local[client], device, args)
            trainer.on_after_local_training(train_local[client], device, args)
            uploads.append((train_num[client], trainer.get_model_params()))
        updates, _ = aggregator.on_before_aggregation(uploads)
        broadcast = aggregator.aggregate(updates)
        if type(broadcast) is dict:  # per-client messages (FedML tells them apart from an OrderedDict by type)
            for client in broadcast:
                broadcast[client] = aggregator.on_after_aggregation(broadcast[client])
        else:
            broadcast = aggregator.on_after_aggregation(broadcast)
        aggregator.set_model_params(broadcast)
        # FedML's cross-silo order with test frequency 1: the server decides which rounds it tests
        aggregator.test_all(train_local, test_local, device, args)
        aggregator.test(test_global, device, args)
        if on_round is not None:
            on_round(fed.server.state.ledger.rows[-1])
    return fed.server.state.ledger.rows


def run_with_progress(fed: Federation, label: str, show: bool = True) -> list[dict]:
    """:func:`run_rounds` under a tqdm bar showing round, stage, last metric and GB so far."""
    from tqdm.auto import tqdm

    bar = tqdm(total=fed.total_rounds, initial=fed.server.state.round, desc=label, unit="round", disable=not show, dynamic_ncols=True)
    last_metric = [float("nan")]

    def update(row: dict) -> None:
        if row["test_metric"] == row["test_metric"]:
            last_metric[0] = row["test_metric"]
        bar.set_postfix(stage=row["stage"], metric=f"{last_metric[0]:.4f}", GB=f"{row['cum_bytes'] / 1e9:.3f}")
        bar.update(1)

    started = time.perf_counter()
    try:
        rows = run_rounds(fed, update)
    finally:
        bar.close()
    log.info("%s: %d rounds in %.1f s", label, fed.total_rounds, time.perf_counter() - started)
    return rows
