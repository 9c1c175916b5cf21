"""``ProgFedServerAggregator``: FedML's ServerAggregator for progressive training.

FedML's cross-silo server calls, per round: ``on_before_aggregation`` ->
``aggregate`` -> ``on_after_aggregation`` -> ``set_model_params`` -> ``test_all``
/ ``test``, and sends what ``aggregate`` returned to the next round's clients
(FEDML_NOTES). This class maps those calls onto the core:

* ``on_before_aggregation`` grows the global model when the schedule enters a
  new stage (the same seeded growth the clients perform) and checks every
  update's stage, round, keys, shapes and values before anything is merged;
* ``aggregate`` forms the sample-weighted mean delta by name, applies the
  server optimiser (FedAvg / FedAdam), records the round in the ledger and
  returns the broadcast for the next round;
* ``test`` evaluates the global sub-model and attaches the result to the round.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from typing import Any, List, Tuple

import torch
from fedml.core import ServerAggregator
from torch.utils.flop_counter import FlopCounterMode

from fedml_progfed.config import RunConfig
from fedml_progfed.core.schedule import schedule_for
from fedml_progfed.core import wire
from fedml_progfed.core.accounting import Ledger
from fedml_progfed.core.compression import Codec
from fedml_progfed.core.seeding import derive_seed
from fedml_progfed.core.server_optim import build_server_optimizer, weighted_mean
from fedml_progfed.core.staged_model import (
    StagedModel,
    active_names,
    active_state,
    check_state,
    count_parameters,
    grow,
    load_active_state,
    upload_names,
)
from fedml_progfed.tasks import ClassificationTask, Task
from fedml_progfed.errors import InvalidUpdateError

log = logging.getLogger("fedml_progfed")
# One line per tested round; the standalone CLI silences it (its progress bar shows the same).
round_log = logging.getLogger("fedml_progfed.rounds")


class ProgFedServerAggregator(ServerAggregator):
    """Merges name-addressed client updates into the global staged model.

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

    def __init__(self, model: StagedModel, args: Any, config: RunConfig, task: Task = ClassificationTask()) -> None:
        super().__init__(model, args)
        self.config = config
        self.schedule = schedule_for(config, model.num_stages)
        self.task = task
        self.server_optimizer = build_server_optimizer(config.progfed)
        self.ledger = Ledger()
        self.round_idx = 0
        self.model.stage = self.schedule.stage(0)
        self._broadcast: OrderedDict | None = None
        self._broadcast_nbytes = 0
        self._round_started = time.perf_counter()
        self._checked_round: int | None = None
        self._pending: list = []
        self.first_broadcast_at: float | None = None
        self._eval_flops: dict[int, int] = {}
        self.codec_up = Codec(config.progfed.compression_up, "progfed_args.progfed_compression_up")
        self.codec_down = Codec(config.progfed.compression_down, "progfed_args.progfed_compression_down")

    # ------------------------------------------------------------------ parameters

    def get_model_params(self) -> "OrderedDict[str, torch.Tensor]":
        """The broadcast for the upcoming round (FedML sends it to every sampled client)."""
        if self._broadcast is None:
            self._broadcast = self._make_broadcast()
        return self._broadcast

    def set_model_params(self, model_parameters) -> None:
        """Load a broadcast-shaped message into the global model (idempotent after ``aggregate``)."""
        if model_parameters is self._broadcast:
            return  # FedML hands back what aggregate returned: it is this model already
        tensors, meta = wire.unpack(model_parameters, what="global model parameters")
        stage = int(meta["stage"])
        if wire.PAYLOAD in tensors:
            return  # an encoded broadcast is a lossy copy of this very model: nothing to load
        if stage != self.model.stage:
            raise InvalidUpdateError(
                f"global model parameters are for stage {stage}, the server model is at stage {self.model.stage}"
            )
        load_active_state(self.model, stage, tensors)

    def _make_broadcast(self) -> "OrderedDict[str, torch.Tensor]":
        if self.first_broadcast_at is None:
            self.first_broadcast_at = time.time()  # wall clock: runtimes report their start-up against it
        stage = self.model.stage
        state = active_state(self.model, stage)
        if not self.codec_down.spec.lossless:
            seed = derive_seed("down", self.config.random_seed, self.round_idx)
            state = wire.encode_tensors(self.codec_down, state, list(state), seed)
        message = wire.pack(state, stage=stage, round=self.round_idx)
        self._broadcast_nbytes = wire.payload_nbytes(message)
        self._round_started = time.perf_counter()
        return message

    # ------------------------------------------------------------------ aggregation

    def on_before_aggregation(self, raw_client_model_or_grad_list: List[Tuple[float, OrderedDict]]):
        updates, client_idxs = super().on_before_aggregation(raw_client_model_or_grad_list)
        self._prepare_round(updates)
        return updates, client_idxs

    def _prepare_round(self, updates: List[Tuple[float, OrderedDict]]) -> None:
        """Grow if this round starts a new stage, then check every update; merge nothing yet."""
        if self._checked_round == self.round_idx:
            return
        if self.round_idx >= self.schedule.total_rounds:
            raise InvalidUpdateError(
                f"round {self.round_idx} is past the schedule's {self.schedule.total_rounds} rounds; "
                f"train_args.comm_round must be the same on server and clients"
            )
        stage = self.schedule.stage(self.round_idx)
        if stage > self.model.stage:
            self._grow(stage)
        expected = upload_names(self.model, stage, self.schedule.is_warmup(self.round_idx))
        if not updates:
            raise InvalidUpdateError(f"round {self.round_idx}: no client updates to aggregate")
        current = self.model.state_dict()
        pending = []
        for i, (samples, message) in enumerate(updates):
            what = f"client update {i + 1} of {len(updates)} in round {self.round_idx}"
            if not samples or samples <= 0:
                raise InvalidUpdateError(f"{what}: reports {samples} training samples; a client needs data to contribute")
            delta, meta = self._client_delta(message, current, stage, expected, what)
            pending.append((float(samples), delta, meta, wire.payload_nbytes(message)))
        self._pending = pending
        self._checked_round = self.round_idx

    def _client_delta(self, message, current, stage: int, names: list[str], what: str):
        """The client's change to every expected tensor, checked (keys, shapes, finite values)."""
        tensors, meta = wire.unpack(message, what=what)
        if meta["stage"] != stage or meta["round"] != self.round_idx:
            raise InvalidUpdateError(
                f"{what}: claims stage {meta['stage']} round {meta['round']} but the server is at stage {stage} "
                f"round {self.round_idx}; the client must train the model it was sent"
            )
        if wire.PAYLOAD not in tensors:
            check_state(self.model, names, tensors, what=what)
            return {n: tensors[n].to(current[n].device).float() - current[n].float() for n in names}, meta
        if "client" not in meta:
            raise InvalidUpdateError(f"{what}: an encoded update must name its client (the decoding seed depends on it)")
        seed = derive_seed("up", self.config.random_seed, self.round_idx, meta["client"])
        decoded = wire.decode_tensors(self.codec_up, tensors, current, names, seed, what)
        check_state(self.model, names, decoded, what=what)
        # Floating tensors arrive as deltas, integer ones (step counters) as values.
        return {
            n: decoded[n].to(current[n].device) if current[n].is_floating_point()
            else decoded[n].to(current[n].device).float() - current[n].float()
            for n in names
        }, meta

    def _grow(self, stage: int) -> None:
        before = set(active_names(self.model, self.model.stage))
        old_stage, old_params = self.model.stage, count_parameters(self.model, self.model.stage)
        entered = grow(self.model, stage, self.config.random_seed)
        surviving = before & set(active_names(self.model, stage))
        self.server_optimizer.on_growth(surviving)
        log.info(
            "round %d: grew from stage %d to %d (%s entered, old head dropped); active parameters %d -> %d",
            self.round_idx, old_stage, stage, ", ".join(entered), old_params, count_parameters(self.model, stage),
        )

    def aggregate(self, raw_client_model_or_grad_list: List[Tuple[float, OrderedDict]]) -> "OrderedDict[str, torch.Tensor]":
        """Server step on the sample-weighted mean delta; returns the next round's broadcast."""
        updates = raw_client_model_or_grad_list
        started = time.perf_counter()
        self._prepare_round(updates)
        stage, warmup = self.model.stage, self.schedule.is_warmup(self.round_idx)
        names = upload_names(self.model, stage, warmup)
        parameters = {n for n, _ in self.model.named_parameters()}
        current = self.model.state_dict()

        mean_delta = weighted_mean([(n, delta) for n, delta, _, _ in self._pending], names)
        trained = [k for k in names if k in parameters]
        stepped = self.server_optimizer.step({k: current[k].float() for k in trained}, {k: mean_delta[k] for k in trained})
        # Buffers (e.g. BatchNorm statistics) are averaged, not optimised.
        averaged = {k: current[k].float() + mean_delta[k] for k in names if k not in parameters}
        merged = {**stepped, **averaged}
        merged = {k: (v.round() if not current[k].is_floating_point() else v).to(current[k].dtype) for k, v in merged.items()}
        load_active_state(self.model, stage, merged, names, check_values=False)  # built from checked deltas

        total = sum(n for n, _, _, _ in self._pending)
        losses = [(n, meta["train_loss"]) for n, _, meta, _ in self._pending if not math.isnan(meta["train_loss"])]
        clients = [
            {
                "client": int(meta.get("client", -1)),
                "bytes_down": self._broadcast_nbytes,
                "bytes_up": nbytes,
                "train_flops": int(meta["flops"]),
                "compute_s": float(meta.get("compute_s", math.nan)),
            }
            for _, _, meta, nbytes in self._pending
        ]
        self.ledger.record_round(
            round_idx=self.round_idx,
            stage=stage,
            active_params=count_parameters(self.model, stage),
            bytes_down=self._broadcast_nbytes * len(updates),
            bytes_up=sum(c["bytes_up"] for c in clients),
            client_flops=sum(c["train_flops"] for c in clients),
            train_loss=sum(n * l for n, l in losses) / total if losses else math.nan,
            wall_s=time.perf_counter() - self._round_started,
            warmup=warmup,
            lr=self.schedule.lr(self.round_idx),
            num_clients=len(updates),
            clients=clients,
            server_s=time.perf_counter() - started,
        )
        self._pending = []
        self.round_idx += 1
        self._broadcast = self._make_broadcast()
        return self._broadcast

    # ------------------------------------------------------------------ evaluation

    def test(self, test_data, device, args) -> dict[str, float]:
        """Evaluate the global sub-model; the result joins the latest round's row."""
        started = time.perf_counter()
        self.model.to(device)
        stage = self.model.stage
        if stage in self._eval_flops:
            scores = self._evaluate(test_data, device)
        else:
            # The first test of a stage runs under the FLOP counter; later tests of the same
            # stage on the same data cost the same, so the count is reused.
            with FlopCounterMode(display=False) as counter:
                scores = self._evaluate(test_data, device)
            self._eval_flops[stage] = int(counter.get_total_flops())
        scores["eval_flops"] = self._eval_flops[stage]
        loss, metric = scores.pop("test_loss"), scores.pop("test_metric")
        elapsed = time.perf_counter() - started
        if self.ledger.records:
            self.ledger.record_test(loss, metric, elapsed, **scores)
            self._round_started += elapsed  # the next round's clock should not include this test
            record = self.ledger.records[-1]
            round_log.info(
                "round %d: stage %d, %s %.4f, %.3f GB two-way so far",
                record.round, record.stage, self.task.metric_name, metric, record.cum_bytes / 1e9,
            )
        return {"test_loss": loss, "test_metric": metric, **scores}

    def _evaluate(self, test_data, device) -> dict[str, float]:
        return dict(self.task.evaluate(self.model, test_data, device))

    def test_all(self, train_data_local_dict, test_data_local_dict, device, args) -> bool:
        """Per-client evaluation is not part of ProgFed's protocol; the global test set is used."""
        return False
