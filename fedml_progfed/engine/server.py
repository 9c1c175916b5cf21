"""The server side of a run, framework-free: broadcast the plan, check and aggregate updates, test.

Wraps an :class:`~fedml_progfed.algorithms.base.Algorithm` and its
:class:`~fedml_progfed.algorithms.base.ServerState`. Everything that is not the
algorithm lives here: building the broadcast message, decoding and checking
every update against the round's plan before anything is merged, counting
bytes from the messages themselves, timing, and the ledger row of each round.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedml_progfed.algorithms.base import Algorithm, ClientUpdate, RoundPlan, ServerState
from fedml_progfed.comm.messages import Header, Message, decode, encode_entries, nbytes
from fedml_progfed.core.staged_model import copy_state, parameter_names, state_shapes
from fedml_progfed.core.budgets import sample_participants
from fedml_progfed.engine.memory import MemoryPlanner
from fedml_progfed.engine.settings import WireSettings
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.tasks.base import Task

log = logging.getLogger("fedml_progfed")
# One line per tested round; the standalone CLI silences it (its progress bar shows the same).
round_log = logging.getLogger("fedml_progfed.rounds")


class Server:
    """Drives one run's rounds on the server (see the module docstring).

    Parameters
    ----------
    algorithm, state
        The algorithm and its state (``algorithm.init_state(model)`` or a restored one).
    task
        Loss and metric of the server's test.
    wire
        Codecs and seed.
    num_clients
        ``client_num_in_total``: valid client ids are ``0..num_clients-1``.
    aggregation_weights
        ``samples`` or ``uniform`` (ProgFed Alg. 1 line 27 averages uniformly).
    """

    def __init__(
        self,
        algorithm: Algorithm,
        state: ServerState,
        task: Task,
        wire: WireSettings,
        num_clients: int,
        aggregation_weights: str = "samples",
        memory: MemoryPlanner | None = None,
        per_round: int | None = None,
    ) -> None:
        self.algorithm = algorithm
        self.state = state
        self.task = task
        self.wire = wire
        self.num_clients = num_clients
        self.per_round = per_round or num_clients
        self.uniform = aggregation_weights == "uniform"
        self.memory = memory
        self._sent: dict[int, int] = {}  # bytes of the broadcast each client got this round
        self._round_columns: dict[str, Any] = {}
        self._warned: set[str] = set()
        self._plan: RoundPlan | None = None
        self._last_plan: RoundPlan | None = None  # the plan of the latest aggregated round
        self._broadcast: OrderedDict[str, torch.Tensor] | None = None
        self._broadcast_nbytes = 0
        self._seeded_params = 0
        self._round_started = time.perf_counter()
        self._eval_flops: dict[str, int] = {}
        self.first_broadcast_at: float | None = None
        # Set by a runtime that sees its transport's bytes: ``take_round() -> {column: bytes}``
        # since the previous round, added to the round's ledger row (e.g. wire_bytes_down/up).
        self.wire_meter: Any = None

    @property
    def model(self):
        return self.state.model

    @property
    def participants(self) -> tuple[int, ...] | None:
        """The upcoming round's participants, if the plan names them (memory budgets)."""
        self.broadcast()
        return self._plan.participants

    @property
    def finished(self) -> bool:
        return self.state.round >= self.algorithm.total_rounds

    # ------------------------------------------------------------------ broadcast

    def broadcast(self):
        """The message for the upcoming round (after the last round: the final model).

        When the plan names its participants and every client is called each round (the
        cross-silo shape), a dict ``{client: message}``: participants get the sub-model,
        the others a few-byte skip notice (FedML sends per-client messages from a dict).
        """
        if self._broadcast is None:
            self._broadcast = self._make_broadcast()
        return self._broadcast

    def is_current_broadcast(self, wire: Any) -> bool:
        return wire is self._broadcast

    def _make_broadcast(self) -> "OrderedDict[str, torch.Tensor]":
        if self.first_broadcast_at is None:
            self.first_broadcast_at = time.time()  # wall clock: runtimes report their start-up against it
        state = self.state
        if self.finished:
            plan = self.algorithm.final_plan(state)
        else:
            plan = self._fit(self.algorithm.start_round(state))
        seeded = self.algorithm.seeded_modules(state, plan)
        layout = self.algorithm.layout(state.model, plan)
        names = [n for n in layout.active if not any(n.startswith(m + ".") for m in seeded)]
        tensors = copy_state(state.model, names)
        codec = self.wire.codec_down
        if codec.spec.lossless:
            plain, payload, kind = tensors, None, "values"
        else:
            lossy = {n for n in names if n in parameter_names(state.model)}
            plain, payload = encode_entries(tensors, names, lossy, codec, self.wire.down_seed(plan.round))
            kind = "encoded"
        header = Header(
            type="broadcast", kind=kind, algorithm=self.algorithm.name, round=plan.round, plan=plan.tag(),
            codec=codec.spec.text, seeded=tuple(seeded),
        )
        message = Message(header, plain, payload).pack()
        params = parameter_names(state.model)
        self._seeded_params = sum(
            t.numel() for n, t in state.model.state_dict().items() if n in params and n in set(layout.active) - set(names)
        )
        self._plan = plan
        self._broadcast_nbytes = nbytes(message)
        self._round_started = time.perf_counter()
        if plan.participants is None or self.per_round < self.num_clients:
            self._sent = {}
            return message
        skip = Message(Header(type="skip", kind="values", algorithm=self.algorithm.name, round=plan.round,
                              plan=plan.tag(), codec=codec.spec.text)).pack()
        chosen = set(plan.participants)
        per_client = {c: (message if c in chosen else skip) for c in range(self.num_clients)}
        self._sent = {c: nbytes(m) for c, m in per_client.items()}
        return per_client

    def _fit(self, plan: RoundPlan) -> RoundPlan:
        """Measure the plan's memory; with budgets, move past steps no client fits and pick participants."""
        self._round_columns = {}
        if self.memory is None:
            return plan
        model = self.state.model
        eligible = self.memory.eligible(model, plan)
        while not eligible:
            reason = f"no client's memory budget fits {self.memory.need(model, plan).key}"
            if not self.algorithm.skip_step(self.state, plan, reason):
                self._warn(reason, f"round {plan.round}: {reason}; the round trains nobody")
                break
            log.warning("round %d: %s; skipping it", plan.round, reason)
            plan = self.algorithm.start_round(self.state)
            eligible = self.memory.eligible(model, plan)
        report = self.memory.need(model, plan)
        self._round_columns = {"eligible_clients": len(eligible), "peak_mem_mb": report.measured_bytes / 1e6}
        if self.memory.budgets(model) is None:
            return plan
        if 0 < len(eligible) < self.per_round:
            self._warn(report.key, f"only {len(eligible)} clients fit {report.key}, fewer than client_num_per_round "
                                   f"({self.per_round}); every one of them trains")
        return replace(plan, participants=sample_participants(eligible, self.per_round, self.wire.seed, plan.round))

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # ------------------------------------------------------------------ aggregation

    def aggregate(self, uploads: Sequence[tuple[Any, Mapping]]) -> "OrderedDict[str, torch.Tensor]":
        """Check every upload against the plan, let the algorithm aggregate, record the round.

        Returns the next round's broadcast. Nothing is merged unless every update is valid.
        """
        started = time.perf_counter()
        self.broadcast()
        plan, state = self._plan, self.state
        if self.finished:
            raise InvalidUpdateError(
                f"round {state.round} is past the run's {self.algorithm.total_rounds} rounds; "
                f"train_args.comm_round must be the same on server and clients"
            )
        if not uploads:
            raise InvalidUpdateError(f"round {plan.round}: no client updates to aggregate")
        updates, skips = [], []
        sent = lambda client: self._sent.get(client, self._broadcast_nbytes)  # noqa: E731
        for position, (samples, wire) in enumerate(uploads):
            message = Message.unpack(
                wire,
                what=f"update {position + 1} of {len(uploads)} in round {plan.round}",
                sender=lambda client: f"client {client}'s update in round {plan.round}",
            )
            client = self._check_header(message, plan, position, len(uploads))
            if message.header.type == "skip":
                skips.append({"client": client, "bytes_down": sent(client), "bytes_up": nbytes(wire), "skipped": True})
                continue
            updates.append(self._check_update(message, client, samples, plan, nbytes(wire)))
        if updates:
            self.algorithm.server_update(state, plan, updates)
        else:
            self.algorithm.skip_round(state, plan)
        called = [u.client for u in updates] + [k["client"] for k in skips]
        self._record(plan, updates, skips, called, started)
        self._last_plan = plan
        self._broadcast = self._make_broadcast()
        return self._broadcast

    def _check_header(self, message: Message, plan: RoundPlan, position: int, count: int) -> int:
        header = message.header
        what = f"update {position + 1} of {count} in round {plan.round}"
        client = header.client
        if client is None or not 0 <= client < self.num_clients:
            raise InvalidUpdateError(f"{what}: client id {client!r} is not in 0..{self.num_clients - 1}")
        what = f"client {client}'s update in round {plan.round}"
        if header.type == "broadcast":
            raise InvalidUpdateError(f"{what}: a client sent a broadcast message")
        if header.algorithm != self.algorithm.name:
            raise InvalidUpdateError(f"{what}: algorithm {header.algorithm!r}, the server runs {self.algorithm.name!r}")
        if header.type == "update" and plan.participants is not None and client not in plan.participants:
            raise InvalidUpdateError(f"{what}: the client was not chosen to train this round (its memory budget "
                                     f"does not fit the round's sub-model)")
        if header.round != plan.round or dict(header.plan) != plan.tag():
            raise InvalidUpdateError(
                f"{what}: it claims round {header.round} with plan {dict(header.plan)} but the server's plan is "
                f"round {plan.round} {plan.tag()}; the client must train the model it was sent"
            )
        return client

    def _check_update(self, message: Message, client: int, samples: Any, plan: RoundPlan, size: int) -> ClientUpdate:
        """Decode one update into changes by name, checking keys, shapes, dtypes and values."""
        what = f"client {client}'s update in round {plan.round}"
        if isinstance(samples, bool) or not isinstance(samples, (int, float)) or not math.isfinite(samples) or samples <= 0:
            raise InvalidUpdateError(f"{what}: reports {samples!r} training samples; it must be a finite positive number")
        model = self.state.model
        names = self.algorithm.layout(model, plan).upload
        current = model.state_dict()
        for name, tensor in message.tensors.items():
            if name in current and tensor.dtype != current[name].dtype:
                raise InvalidUpdateError(f"{what}: {name} has dtype {tensor.dtype}, the model has {current[name].dtype}")
        tensors, delta_names = decode(
            message, names, parameter_names(model), state_shapes(model), self.wire.codec_up,
            self.wire.up_seed(plan.round, client), what,
        )
        deltas = {}
        for name in names:
            value = tensors[name]
            if tuple(value.shape) != tuple(current[name].shape):
                raise InvalidUpdateError(f"{what}: {name} has shape {tuple(value.shape)}, the model has {tuple(current[name].shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise InvalidUpdateError(f"{what}: {name} contains NaN or Inf; lower the learning rate or check the client's data")
            value = value.to(current[name].device)
            deltas[name] = value if name in delta_names else value.float() - current[name].float()
        metrics = message.header.metrics
        return ClientUpdate(
            client=client,
            weight=1.0 if self.uniform else float(samples),
            deltas=deltas,
            samples=float(samples),
            train_loss=float(metrics.get("train_loss", math.nan)),
            flops=int(metrics.get("flops", 0)),
            compute_s=float(metrics.get("compute_s", math.nan)),
            nbytes=size,
        )

    def _record(self, plan: RoundPlan, updates: list[ClientUpdate], skips: list[dict], called: list[int], started: float) -> None:
        full = self._broadcast_nbytes
        sent = [self._sent.get(c, full) for c in called]
        model = self.state.model
        layout = self.algorithm.layout(model, plan)
        active = set(layout.active)
        total = sum(u.samples for u in updates)
        losses = [(u.samples, u.train_loss) for u in updates if not math.isnan(u.train_loss)]
        clients = [
            {
                "client": u.client,
                "bytes_down": self._sent.get(u.client, self._broadcast_nbytes),
                "bytes_up": u.nbytes,
                "train_flops": u.flops,
                "compute_s": u.compute_s,
            }
            for u in updates
        ] + skips
        self.state.ledger.record_round(
            round_idx=plan.round,
            stage=plan.stage,
            active_params=sum(p.numel() for n, p in model.named_parameters() if n in active),
            bytes_down=sum(sent),
            bytes_up=sum(c["bytes_up"] for c in clients),
            client_flops=sum(u.flops for u in updates),
            train_loss=sum(n * loss for n, loss in losses) / total if losses else math.nan,
            wall_s=time.perf_counter() - self._round_started,
            warmup=plan.warmup,
            lr=plan.lr,
            num_clients=len(updates),
            clients=clients,
            server_s=time.perf_counter() - started,
            seeded_params=self._seeded_params * sum(1 for size in sent if size == full),
            columns={
                **self.algorithm.ledger_columns(self.state, plan), **self._round_columns,
                **(self.wire_meter.take_round() if self.wire_meter is not None else {}),
            },
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, batches, device: torch.device) -> dict[str, float]:
        """Test the sub-model the latest round trained; the result joins that round's ledger row."""
        started = time.perf_counter()
        plan = self._last_plan or self.algorithm.plan(self.state)
        self.state.model.to(device)
        key = json.dumps({"stage": plan.stage, "details": dict(plan.details)}, sort_keys=True)
        with self.algorithm.evaluated(self.state.model, plan) as model:
            if key in self._eval_flops:
                scores = dict(self.task.evaluate(model, batches, device))
            else:
                # The first test of a sub-model runs under the FLOP counter; later tests of the
                # same sub-model on the same data cost the same, so the count is reused.
                with FlopCounterMode(display=False) as counter:
                    scores = dict(self.task.evaluate(model, batches, device))
                self._eval_flops[key] = int(counter.get_total_flops())
        scores["eval_flops"] = self._eval_flops[key]
        loss, metric = scores.pop("test_loss"), scores.pop("test_metric")
        elapsed = time.perf_counter() - started
        ledger = self.state.ledger
        if ledger.records:
            ledger.record_test(loss, metric, elapsed, **scores)
            self._round_started += elapsed  # the next round's clock should not include this test
            record = ledger.records[-1]
            round_log.info(
                "round %d: stage %d, %s %.4f, %.3f GB two-way so far",
                record.round, record.stage, self.task.metric_name, metric, record.cum_bytes / 1e9,
            )
        return {"test_loss": loss, "test_metric": metric, **scores}
