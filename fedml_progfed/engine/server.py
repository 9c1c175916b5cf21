"""The server side of a run, framework-free: broadcast the plan, check and aggregate updates, test.

Wraps an :class:`~fedml_progfed.algorithms.base.Algorithm` and its
:class:`~fedml_progfed.algorithms.base.ServerState`. Everything that is not the
algorithm lives here: building the broadcast message, decoding and checking
every update against the round's plan before anything is merged, counting
bytes from the messages themselves, timing, and the ledger row of each round.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedml_progfed.algorithms.base import Algorithm, ClientUpdate, RoundPlan, ServerState
from fedml_progfed.comm.messages import Header, Message, encode_entries, nbytes
from fedml_progfed.core.staged_model import copy_state, load_state, parameter_names
from fedml_progfed.core.budgets import sample_participants
from fedml_progfed.engine.checks import UpdateChecker, UpdatePolicy, claimed_client as _claimed_client
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
    test_every
        ``frequency_of_the_test``: :meth:`end_round` tests every that many rounds and after the last.
    policy
        What to do with invalid updates, and the optional defences (:class:`UpdatePolicy`).
    """

    def __init__(
        self,
        algorithm: Algorithm,
        state: ServerState,
        task: Task,
        wire: WireSettings,
        num_clients: int,
        policy: UpdatePolicy = UpdatePolicy(),
        memory: MemoryPlanner | None = None,
        per_round: int | None = None,
        test_every: int = 1,
        diagnostics: bool = False,
    ) -> None:
        self.algorithm = algorithm
        self.state = state
        self.task = task
        self.wire = wire
        self.num_clients = num_clients
        self.per_round = per_round or num_clients
        self.checker = UpdateChecker(algorithm, wire, num_clients, policy)
        self.test_every = test_every
        self.diagnostics = diagnostics
        self._diagnostic_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        #: Called with the server after every round (metrics file, checkpoints).
        self.round_hooks: list[Callable[["Server"], None]] = []
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

        Returns the next round's broadcast. An invalid update is dropped with its client id and reason
        (or ends the run under ``progfed_invalid_update: abort``); with fewer than
        ``progfed_min_clients`` valid updates, or a merged model that is not finite, the round is
        skipped and the global model kept.
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
        updates, others = [], []
        sent = lambda client: self._sent.get(client, self._broadcast_nbytes)  # noqa: E731
        for position, (samples, wire) in enumerate(uploads):
            size = nbytes(wire) if isinstance(wire, Mapping) else 0
            try:
                message = Message.unpack(
                    wire,
                    what=f"update {position + 1} of {len(uploads)} in round {plan.round}",
                    sender=lambda client: f"client {client}'s update in round {plan.round}",
                )
                client = self.checker.header(message, plan, position, len(uploads))
                if message.header.type == "skip":
                    others.append({"client": client, "bytes_down": sent(client), "bytes_up": size, "skipped": True})
                    continue
                updates.append(self.checker.update(state.model, message, client, samples, plan, size))
            except InvalidUpdateError as exc:
                if self.checker.policy.invalid == "abort":
                    raise
                client = _claimed_client(wire)
                log.warning("round %d: dropped an update: %s", plan.round, exc)
                others.append({"client": client, "bytes_down": sent(client) if client is not None else self._broadcast_nbytes,
                               "bytes_up": size, "dropped": str(exc)})
        if len(updates) >= self.checker.policy.min_clients and self._merge(plan, updates, others):
            pass
        else:
            if updates and len(updates) < self.checker.policy.min_clients:
                log.warning("round %d: %d valid updates, fewer than progfed_min_clients (%d); the round is skipped and "
                            "the global model kept", plan.round, len(updates), self.checker.policy.min_clients)
            self.algorithm.skip_round(state, plan)
            updates = []
        self._record(plan, updates, others, started)
        self._last_plan = plan
        self._broadcast = self._make_broadcast()
        return self._broadcast

    def _merge(self, plan: RoundPlan, updates: list[ClientUpdate], others: list[dict]) -> bool:
        """Let the algorithm aggregate; undo everything if the merged global model is not finite."""
        state = self.state
        names = self.algorithm.layout(state.model, plan).upload
        saved = (copy_state(state.model, names), state.optimizer.state_dict(), state.round,
                 copy.deepcopy(state.extra), {k: v.clone() for k, v in state.extra_tensors.items()})
        self.algorithm.server_update(state, plan, updates)
        merged = state.model.state_dict()
        broken = [n for n in names if merged[n].is_floating_point() and not bool(torch.isfinite(merged[n]).all())]
        if not broken:
            return True
        tensors, (opt_tensors, opt_meta), state.round, state.extra, state.extra_tensors = saved
        load_state(state.model, tensors, names, what="restore")
        state.optimizer.load_state_dict(opt_tensors, opt_meta)
        reason = f"the merged global model has NaN or Inf in {broken[:3]}; the round is skipped and the model kept"
        log.warning("round %d: %s", plan.round, reason)
        for update in updates:
            others.append({"client": update.client, "bytes_down": self._sent.get(update.client, self._broadcast_nbytes),
                           "bytes_up": update.nbytes, "dropped": reason})
        return False

    def _record(self, plan: RoundPlan, updates: list[ClientUpdate], others: list[dict], started: float) -> None:
        full = self._broadcast_nbytes
        called = [u.client for u in updates] + [o["client"] for o in others if o["client"] is not None]
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
        ] + others
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
                **self.algorithm.ledger_columns(self.state, plan),
                **self._round_columns,
                "dropped_clients": sum(1 for o in others if "dropped" in o),
                **(self.wire_meter.take_round() if self.wire_meter is not None else {}),
            },
        )

    # ------------------------------------------------------------------ end of a round

    def end_round(self, batches, device: torch.device) -> dict[str, float]:
        """After a round's aggregation: test if it is a test round, then run the round hooks.

        Both runtimes call this once per round (FedML through the aggregator's ``test``), so
        the rounds tested and the files written do not depend on where a run started.
        """
        plan = self._last_plan
        if plan is None:
            return {}
        due = plan.round % self.test_every == 0 or plan.round == self.algorithm.total_rounds - 1
        scores = self.evaluate(batches, device) if due else {}
        if due and self.diagnostics:
            scores.update(self._diagnose(batches, device, plan))
        for hook in self.round_hooks:
            hook(self)
        return scores

    def _diagnose(self, batches, device: torch.device, plan: RoundPlan) -> dict[str, float]:
        """The algorithm's diagnostics on a fixed batch of the server's test data (cost logged)."""
        started = time.perf_counter()
        if self._diagnostic_batch is None:
            self._diagnostic_batch = next(iter(batches))
        x, y = (t.to(device) for t in self._diagnostic_batch)
        values = self.algorithm.diagnose(self.state.model, plan, x, y)
        if self.state.ledger.records:
            self.state.ledger.records[-1].columns.update(values)
        log.info("round %d: diagnostics %s in %.2f s", plan.round,
                 ", ".join(f"{k} {v:.4g}" for k, v in values.items()), time.perf_counter() - started)
        return values

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything a resumed run needs from this end: the algorithm's state and the measured memory."""
        tensors, meta = self.state.state_dict()
        meta["memory"] = self.memory.state_dict() if self.memory is not None else None
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Continue from :meth:`checkpoint`: the next broadcast is the restored round's."""
        self.state.load_state_dict(tensors, meta)
        if self.memory is not None and meta.get("memory") is not None:
            self.memory.load_state_dict(meta["memory"])
        self._broadcast = self._plan = self._last_plan = None

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
