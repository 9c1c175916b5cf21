"""The server side of a run, framework-free, in two halves: start a round, finish it.

Wraps an :class:`~fedml_progfed.algorithms.base.Algorithm` and its
:class:`~fedml_progfed.algorithms.base.ServerState`:

* :meth:`Server.start_round` lets the algorithm prepare the round (growth, step
  change), fits it to the clients' memory, computes its layout once and builds the
  :class:`~fedml_progfed.engine.round.Round`: an assignment and a message per client.
* :meth:`Server.finish_round` checks every update against its client's assignment,
  merges, tests the model the round trained, writes the round's whole metrics row
  in one place and runs the round hooks (metrics file, checkpoints).

Only the runtimes (the standalone loop, the FedML adapters) chain the two.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedml_progfed.algorithms.base import Algorithm, Assignment, ClientUpdate, Layout, RoundPlan, ServerState
from fedml_progfed.comm.messages import Header, Message, encode_entries, nbytes, values_crc
from fedml_progfed.core.budgets import sample_participants
from fedml_progfed.core.staged_model import copy_state, load_state, parameter_names
from fedml_progfed.core.width import leading_slice
from fedml_progfed.engine.checks import UpdateChecker, UpdatePolicy, claimed_client
from fedml_progfed.engine.memory import MemoryPlanner
from fedml_progfed.engine.references import ChangeBroadcaster
from fedml_progfed.engine.round import Round
from fedml_progfed.engine.sampling import sample_clients
from fedml_progfed.engine.settings import WireSettings
from fedml_progfed.engine.versions import VersionTable
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.tasks.base import Task

log = logging.getLogger("fedml_progfed")
# One line per tested round; the standalone CLI silences it (its progress bar shows the same).
round_log = logging.getLogger("fedml_progfed.rounds")


def silent_column(others: Sequence[Mapping[str, Any]]) -> str:
    """``metrics.csv``'s ``silent_clients``: the silent clients' ids, ascending, space-separated ("" for none)."""
    return " ".join(str(c) for c in sorted(o["client"] for o in others if o.get("silent")))


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
    policy
        What to do with invalid updates, and the optional defences (:class:`UpdatePolicy`).
    memory
        Measures each sub-model's memory and, with budgets, which clients fit it.
    per_round
        ``client_num_per_round``.
    test_every
        ``frequency_of_the_test``: rounds tested (and always the last).
    diagnostics
        Compute the algorithm's diagnostics on every tested round.
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
        self.checker = UpdateChecker(algorithm.name, wire, num_clients, policy)
        self.test_every = test_every
        self.diagnostics = diagnostics
        self.memory = memory
        #: Which version of each tensor each client holds (``progfed.cache_unchanged``).
        self.versions = VersionTable()
        #: Compressed change broadcasts: what each client reconstructed, and its next message.
        self.changes = ChangeBroadcaster(wire, algorithm.name, num_clients, self.per_round) \
            if wire.codec_changes is not None else None
        #: The round started and not yet finished (``None`` between the halves).
        self.current: Round | None = None
        #: Scores of the latest finished round's test (empty when it was not tested).
        self.last_scores: dict[str, float] = {}
        #: Called with the server after every finished round (metrics file, checkpoints).
        self.round_hooks: list[Callable[["Server"], None]] = []
        #: Set by a runtime that sees its transport's bytes: ``take_round() -> {column: bytes}``
        #: since the previous round, added to the round's row (e.g. wire_bytes_down/up).
        self.wire_meter: Any = None
        self.first_broadcast_at: float | None = None
        self._warned: set[str] = set()
        self._eval_flops: dict[str, int] = {}
        self._diagnostic_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def model(self):
        return self.state.model

    @property
    def finished(self) -> bool:
        return self.state.round >= self.algorithm.total_rounds

    # ------------------------------------------------------------------ first half: start a round

    def start_round(self) -> Round:
        """Prepare round ``state.round`` and build its messages (after the last round: the final model)."""
        if self.current is not None:
            raise InvalidUpdateError(f"round {self.current.plan.round} was started and not finished; finish it first")
        if self.first_broadcast_at is None:
            self.first_broadcast_at = time.time()  # wall clock: runtimes report their start-up against it
        started = time.perf_counter()
        model = self.state.model
        layouts: dict[str, Layout] = {}

        def layout_of(plan: RoundPlan) -> Layout:
            key = json.dumps(plan.tag(), sort_keys=True)
            if key not in layouts:
                layouts[key] = self.algorithm.layout(model, plan)
            return layouts[key]

        chosen: dict[int, Assignment] = {}
        variants: Sequence[RoundPlan] = ()
        if self.finished:
            plan = self.algorithm.start_round(self.state, lambda plan: None)
            layout, columns = layout_of(plan), {}
        else:
            plan = self.algorithm.start_round(self.state, lambda plan: self._untrainable(plan, layout_of(plan)))
            variants = self.algorithm.variants(model, plan)
            if len(variants) > 1:
                tiers = [Assignment(v, layout_of(v)) for v in variants]
                first, participants, chosen, columns = self._fit_variants(tiers, plan.round)
                plan, layout = replace(first.plan, participants=participants), first.layout
            else:
                layout = layout_of(plan)
                plan, columns = self._fit(plan, layout)
                if self.state.privacy is not None:
                    plan = self._draw_private(plan, layout)
                elif self.state.record_privacy is not None and self.state.record_privacy.target is not None:
                    plan = self._leave_out_spent(plan)
        default = Assignment(plan, layout)
        round_ = Round(plan=plan, layout=layout, default=default, num_clients=self.num_clients,
                       default_message=self._encode(default), columns=columns,
                       seeded_params=self._seeded_params(layout), started=started)
        if len(variants) > 1 and plan.participants is not None:
            self._give_variants(round_, chosen)
        elif plan.participants is not None and self.per_round >= self.num_clients:
            # Every client is called each round (the cross-silo shape): participants get the
            # sub-model, the others a few-byte skip notice (FedML sends per-client messages from a dict).
            participants = set(plan.participants)
            round_.assignments = {c: (default if c in participants else None) for c in range(self.num_clients)}
            round_.skip, round_.per_client = self._skip(plan), True
        elif plan.participants is not None:
            round_.assignments = {c: default for c in plan.participants}
        if self.wire.cache_unchanged and not self.finished and not chosen and not layout.narrow:
            self._leave_out_what_clients_hold(round_)
        if self.changes is not None and not self.finished:
            self.changes.send(round_, self.state.model)
        self.current = round_
        return round_

    def _skip(self, plan: RoundPlan) -> Any:
        """The few-byte notice a called client that does not train this round gets."""
        return Message(Header(type="skip", kind="values", algorithm=self.algorithm.name, round=plan.round,
                              plan=plan.tag(), codec=self.wire.codec_down.spec.text)).pack()

    def _fit_variants(self, variants: Sequence[Assignment], round_idx: int
                      ) -> tuple[Assignment, tuple[int, ...] | None, dict[int, Assignment], dict[str, Any]]:
        """(the round's own variant, participants, their assignments, memory columns).

        Each client gets the costliest variant its memory fits, or, for an algorithm whose
        ``shared_variant`` is set (AllSmall), everyone the costliest that every client fits; the
        participants are sampled among the clients that fit. Without budgets nobody is assigned
        here: the runtime samples and everyone trains the first variant.
        """
        model = self.state.model
        if self.memory is None:
            return variants[0], None, {}, {}
        reports = {v.layout.label: self.memory.need(model, v) for v in variants}
        if self.memory.budgets(model) is None:
            first = reports[variants[0].layout.label]
            return variants[0], None, {}, {"eligible_clients": self.num_clients, "peak_mem_mb": first.measured_bytes / 1e6}
        fits: dict[int, Assignment] = {}
        if self.algorithm.shared_variant:
            fitting = [(v, self.memory.eligible(model, v)) for v in variants]
            shared, clients = next(((v, c) for v, c in fitting if len(c) == self.num_clients), fitting[-1])
            fits = {client: shared for client in clients}
        else:
            for variant in variants:
                for client in self.memory.eligible(model, variant):
                    fits.setdefault(client, variant)
        unfit = self.num_clients - len(fits)
        if unfit:
            smallest = variants[-1].layout.label
            self._warn("fits no variant", f"{unfit} of {self.num_clients} clients fit no sub-model of "
                                          f"{self.algorithm.name} (the smallest, {smallest}, needs "
                                          f"{self.memory.bytes_of(reports[smallest]) / 1e6:.1f} MB); they never train")
        participants = sample_participants(sorted(fits), self.per_round, self.wire.seed, round_idx)
        chosen = {c: Assignment(replace(fits[c].plan, participants=participants), fits[c].layout) for c in participants}
        if not fits:
            self._warn("fits nobody", f"round {round_idx}: no client's memory budget fits any sub-model of "
                                      f"{self.algorithm.name}; the round trains nobody")
        peaks = [reports[a.layout.label].measured_bytes for a in chosen.values()]
        first = shared if self.algorithm.shared_variant else variants[0]
        return first, participants, chosen, {"eligible_clients": len(fits), "peak_mem_mb": max(peaks, default=0) / 1e6}

    def _give_variants(self, round_: Round, chosen: Mapping[int, Assignment]) -> None:
        """Per-client assignments and messages; clients with the same variant share one encoded message."""
        encoded: dict[str, Any] = {}
        for client, assignment in chosen.items():
            label = assignment.layout.label
            if label not in encoded:
                encoded[label] = self._encode(assignment)
            round_.messages[client] = encoded[label]
        round_.assignments = dict(chosen)
        if self.per_round >= self.num_clients:
            round_.assignments.update({c: None for c in range(self.num_clients) if c not in chosen})
            round_.skip = self._skip(round_.plan)
        round_.per_client = True

    def _leave_out_what_clients_hold(self, round_: Round) -> None:
        """Give each client that already holds some of the round's tensors a message without them.

        Clients that hold the same tensors share one encoded message, so encoding time and memory
        grow with the number of distinct messages, not with the clients of a round.
        """
        round_.versions = self.versions.refresh(self.state.model.state_dict(), round_.layout.sent)
        callable_clients = round_.participants if round_.participants is not None else range(self.num_clients)
        shared: dict[tuple[str, ...], Any] = {}
        for client in callable_clients:
            held = self.versions.unchanged(client, round_.versions)
            if held:
                if held not in shared:
                    shared[held] = self._encode(round_.default, held)
                round_.messages[client] = shared[held]
        round_.per_client = round_.per_client or bool(round_.messages)

    def _encode(self, assignment: Assignment, held: tuple[str, ...] = ()) -> Any:
        """One encoded broadcast of ``assignment`` without the tensors in ``held`` (the receiver has them)."""
        plan, layout, model = assignment.plan, assignment.layout, self.state.model
        left_out = set(held)
        names = [n for n in layout.sent if n not in left_out]
        codec = self.wire.codec_down
        tensors = copy_state(model, names)
        for name, shape in layout.narrow.items():
            if name in tensors:
                tensors[name] = leading_slice(tensors[name], shape).clone()
        if codec.spec.lossless:
            plain, payload, kind = tensors, None, "values"
        else:
            plain, payload = encode_entries(tensors, names, parameter_names(model), codec, self.wire.down_seed(plan.round))
            kind = "encoded"
        crc = values_crc(model.state_dict(), held) if held else None
        header = Header(type="broadcast", kind=kind, algorithm=self.algorithm.name, round=plan.round, plan=plan.tag(),
                        codec=codec.spec.text, seeded=layout.seeded, cached=held, cached_crc=crc)
        return Message(header, plain, payload).pack()

    def _draw_private(self, plan: RoundPlan, layout: Layout) -> RoundPlan:
        """Client-level DP: the participants are the privacy mechanism's secret draw among the clients
        the round's memory fits (every client without budgets), not FedML's public per-round sample."""
        model = self.state.model
        if self.memory is not None and self.memory.budgets(model) is not None:
            eligible = self.memory.eligible(model, Assignment(plan, layout))
        else:
            eligible = range(self.num_clients)
        return replace(plan, participants=self.state.privacy.participants(eligible, plan.round))

    def _leave_out_spent(self, plan: RoundPlan) -> RoundPlan:
        """Record-level DP with a target: FedML's sample of the round, less the clients whose budget is spent."""
        called = plan.participants if plan.participants is not None else \
            sample_clients(plan.round, self.num_clients, self.per_round)
        spent = self.state.record_privacy
        return replace(plan, participants=tuple(c for c in called if not spent.exhausted(c, plan.round)))

    def _seeded_params(self, layout: Layout) -> int:
        if not layout.seeded:
            return 0
        sent, params = set(layout.sent), parameter_names(self.state.model)
        return sum(t.numel() for n, t in self.state.model.state_dict().items()
                   if n in params and n in layout.active and n not in sent)

    def _untrainable(self, plan: RoundPlan, layout: Layout) -> str | None:
        """Why no client can train ``plan`` under the memory budgets, or ``None``."""
        if self.memory is None or self.memory.eligible(self.state.model, Assignment(plan, layout)):
            return None
        return f"no client's memory budget fits {layout.label}"

    def _fit(self, plan: RoundPlan, layout: Layout) -> tuple[RoundPlan, dict[str, Any]]:
        """Measure the plan's memory; with budgets, pick its participants among the clients it fits."""
        if self.memory is None:
            return plan, {}
        model, assignment = self.state.model, Assignment(plan, layout)
        eligible = self.memory.eligible(model, assignment)
        report = self.memory.need(model, assignment)
        columns = {"eligible_clients": len(eligible), "peak_mem_mb": report.measured_bytes / 1e6}
        if not eligible:
            reason = self._untrainable(plan, layout)
            self._warn(reason, f"round {plan.round}: {reason}; the round trains nobody")
        if self.memory.budgets(model) is None:
            return plan, columns
        if 0 < len(eligible) < self.per_round:
            self._warn(report.key, f"only {len(eligible)} clients fit {report.key}, fewer than client_num_per_round "
                                   f"({self.per_round}); every one of them trains")
        return replace(plan, participants=sample_participants(eligible, self.per_round, self.wire.seed, plan.round)), columns

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # ------------------------------------------------------------------ second half: finish it

    def finish_round(self, uploads: Sequence[tuple[Any, Mapping]], test_batches=None,
                     device: torch.device | None = None) -> dict[str, float]:
        """Check every upload, merge, test the model this round trained, record the round's row.

        An invalid update is dropped with its client id and reason (or ends the run under
        ``progfed.invalid_update: abort``). A silent answer (:func:`~fedml_progfed.comm.messages.silent_answer`)
        is neither merged nor dropped: the client is named in ``silent_clients`` and counts
        towards neither ``min_clients`` nor ``dropped_clients``. With fewer than
        ``progfed.min_clients`` valid updates, or a merged model that is not finite, the round
        is skipped and the global model kept. Returns the test scores (empty on a round that is
        not tested).
        """
        started = time.perf_counter()
        round_, state = self.current, self.state
        if round_ is None or self.finished:
            raise InvalidUpdateError(
                f"round {state.round} is past the run's {self.algorithm.total_rounds} rounds; "
                f"comm_round must be the same on server and clients"
            )
        plan = round_.plan
        if not uploads and plan.participants != ():  # a plan no client's memory fits calls nobody
            raise InvalidUpdateError(f"round {plan.round}: no client updates to aggregate")
        updates, others = self._check(round_, uploads)
        policy = self.checker.policy
        # a charged private round releases its noised mean whatever arrived (min_clients would make
        # the release depend on an un-noised count)
        quorum = len(updates) >= policy.min_clients or (state.privacy is not None and state.privacy.drew(plan.round))
        if not (quorum and self._merge(round_, updates, others)):
            silent = sum(1 for o in others if o.get("silent"))
            if (updates or silent) and len(updates) < policy.min_clients:
                log.warning("round %d: %d valid updates (%d clients silent), fewer than progfed_min_clients (%d); the "
                            "round is skipped and the global model kept", plan.round, len(updates), silent,
                            policy.min_clients)
            updates = []
        state.round += 1
        tested = plan.round % self.test_every == 0 or plan.round == self.algorithm.total_rounds - 1
        scores = self._test(plan, test_batches, device) if tested and test_batches is not None else {}
        batch = self._diagnostic(test_batches, device) if scores and self.diagnostics else None
        diagnostics_started = time.perf_counter()
        columns = self.algorithm.report(state, plan, batch)
        if batch is not None:
            log.info("round %d: diagnostics in %.2f s", plan.round, time.perf_counter() - diagnostics_started)
        self._record(round_, updates, others, scores, columns, finish_started=started)
        self.current, self.last_scores = None, scores
        for hook in self.round_hooks:
            hook(self)
        return scores

    def _check(self, round_: Round, uploads: Sequence[tuple[Any, Mapping]]) -> tuple[list[ClientUpdate], list[dict]]:
        """Decode and check each upload against its client's assignment; a failing one is dropped (or aborts)."""
        plan, state = round_.plan, self.state
        updates: list[ClientUpdate] = []
        others: list[dict] = []
        for position, (samples, wire) in enumerate(uploads):
            size = nbytes(wire) if isinstance(wire, Mapping) else 0
            try:
                message = Message.unpack(
                    wire,
                    what=f"update {position + 1} of {len(uploads)} in round {plan.round}",
                    sender=lambda client: f"client {client}'s update in round {plan.round}",
                )
                client = self.checker.header(message, round_, position, len(uploads))
                if message.header.type == "silent":
                    if self.changes is not None:  # a silent client received (the deadline, which may not, is refused)
                        self.changes.references.confirm(client)
                    others.append(self._silent(round_, client))
                    continue
                if round_.versions and round_.assignment(client) is not None:
                    self.versions.received(client, round_.versions)  # its answer proves the message arrived
                if self.changes is not None:
                    self.changes.references.confirm(client)
                if message.header.type == "skip":
                    others.append({"client": client, "bytes_down": round_.bytes_to(client), "bytes_up": size,
                                   "skipped": True})
                    continue
                if state.record_privacy is not None:
                    # the update left the silo: its DP-SGD steps are spent whether or not it is merged or valid
                    state.record_privacy.charge(client, self.checker.private_steps(message, client, plan.round))
                updates.append(self.checker.update(state.model, message, client, samples, round_.assignment(client), size))
            except InvalidUpdateError as exc:
                if self.checker.policy.invalid == "abort":
                    raise
                client = claimed_client(wire)
                log.warning("round %d: dropped an update: %s", plan.round, exc)
                sent = round_.bytes_to(client) if client is not None and 0 <= client < self.num_clients \
                    else round_.full_message_bytes
                others.append({"client": client, "bytes_down": sent, "bytes_up": size, "dropped": str(exc)})
        return updates, others

    def _silent(self, round_: Round, client: int) -> dict:
        """The per-client record of a client that was sent the round and answered nothing.

        Its broadcast counts (it was sent); nothing counts up, whatever bytes the silent answer
        itself took, because it stands for an answer that never came (standalone dropout and a
        transport's deadline stand-in then agree). The version table is not told it received
        the round: a silo the deadline left out may never have, so it is sent in full later.
        """
        return {"client": client, "bytes_down": round_.bytes_to(client), "bytes_up": 0, "silent": True}

    def _merge(self, round_: Round, updates: list[ClientUpdate], others: list[dict]) -> bool:
        """Let the algorithm aggregate; undo everything if the merged global model is not finite."""
        state, plan, names = self.state, round_.plan, round_.layout.upload
        saved = (copy_state(state.model, names), state.optimizer.state_dict(), copy.deepcopy(state.algorithm))
        self.algorithm.server_update(state, plan, round_.layout, updates)
        merged = state.model.state_dict()
        broken = [n for n in names if merged[n].is_floating_point() and not bool(torch.isfinite(merged[n]).all())]
        if not broken:
            return True
        tensors, (opt_tensors, opt_meta), algorithm_state = saved
        if state.algorithm is not None:  # in place: the algorithm may hold a reference to its state
            vars(state.algorithm).update(vars(algorithm_state))
        load_state(state.model, tensors, names, what="restore")
        state.optimizer.load_state_dict(opt_tensors, opt_meta)
        reason = f"the merged global model has NaN or Inf in {broken[:3]}; the round is skipped and the model kept"
        log.warning("round %d: %s", plan.round, reason)
        for update in updates:
            others.append({"client": update.client, "bytes_down": round_.bytes_to(update.client),
                           "bytes_up": update.nbytes, "dropped": reason})
        return False

    def _test(self, plan: RoundPlan, batches, device: torch.device | None) -> dict[str, float]:
        """Test the module the round trained (``Algorithm.scored``); FLOPs counted once per sub-model."""
        device = device or next(self.state.model.parameters()).device
        self.state.model.to(device)
        model = self.algorithm.scored(self.state.model, plan)
        key = json.dumps({"stage": plan.stage, "details": dict(plan.details)}, sort_keys=True)
        if key in self._eval_flops:
            scores = dict(self.task.evaluate(model, batches, device))
        else:
            # The first test of a sub-model runs under the FLOP counter; later tests of the
            # same sub-model on the same data cost the same, so the count is reused.
            with FlopCounterMode(display=False) as counter:
                scores = dict(self.task.evaluate(model, batches, device))
            self._eval_flops[key] = int(counter.get_total_flops())
        scores["eval_flops"] = self._eval_flops[key]
        for name, extra in self.algorithm.extra_scored(self.state.model, plan).items():
            scores[f"test_metric_{name}"] = self.task.evaluate(extra, batches, device)["test_metric"]
        return scores

    def _diagnostic(self, batches, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed batch of the server's test data for the algorithm's diagnostics."""
        if self._diagnostic_batch is None:
            self._diagnostic_batch = next(iter(batches))
        device = device or next(self.state.model.parameters()).device
        x, y = self._diagnostic_batch
        return x.to(device), y.to(device)

    def _record(self, round_: Round, updates: list[ClientUpdate], others: list[dict], scores: Mapping[str, float],
                columns: Mapping[str, Any], finish_started: float) -> None:
        """The round's whole metrics row, written in one place."""
        plan, model = round_.plan, self.state.model
        clients = [
            {"client": u.client, "bytes_down": round_.bytes_to(u.client), "bytes_up": u.nbytes,
             "train_flops": u.flops, "compute_s": u.compute_s, "train_samples": u.train_samples}
            for u in updates
        ] + others
        called = [c["client"] for c in clients if c["client"] is not None]
        sent = [round_.bytes_to(c) for c in called]
        full = round_.full_message_bytes
        total = sum(u.samples for u in updates)
        losses = [(u.samples, u.train_loss) for u in updates if not math.isnan(u.train_loss)]
        active = set(round_.layout.active)
        scores = dict(scores)
        test_loss, test_metric = scores.pop("test_loss", math.nan), scores.pop("test_metric", math.nan)
        record = self.state.ledger.append(
            round_idx=plan.round,
            stage=plan.stage,
            active_params=sum(p.numel() for n, p in model.named_parameters() if n in active),
            bytes_down=sum(sent),
            bytes_up=sum(c["bytes_up"] for c in clients),
            client_flops=sum(u.flops for u in updates),
            train_loss=sum(n * loss for n, loss in losses) / total if losses else math.nan,
            test_loss=test_loss,
            test_metric=test_metric,
            wall_s=time.perf_counter() - round_.started,
            warmup=plan.warmup,
            lr=plan.lr,
            num_clients=len(updates),
            clients=clients,
            server_s=time.perf_counter() - finish_started,
            seeded_params=round_.seeded_params * sum(1 for size in sent if size == full),
            columns={
                **columns,
                **round_.columns,
                "dropped_clients": sum(1 for o in others if "dropped" in o),
                "silent_clients": silent_column(others),
                **self._epsilon(),
                **(self.wire_meter.take_round() if self.wire_meter is not None else {}),
                **scores,
            },
        )
        if not math.isnan(test_metric):
            round_log.info("round %d: stage %d, %s %.4f, %.3f GB two-way so far", record.round, record.stage,
                           self.task.metric_name, test_metric, record.cum_bytes / 1e9)

    def _epsilon(self) -> dict[str, float]:
        """``metrics.csv``'s ``epsilon`` (at the configured delta) with DP: the run's, or the largest client's."""
        privacy = self.state.privacy or self.state.record_privacy
        return {"epsilon": privacy.epsilon()} if privacy is not None else {}

    # ------------------------------------------------------------------ restarts

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything a resumed run needs from this end: the algorithm's state and the measured memory."""
        tensors, meta = self.state.state_dict()
        meta["memory"] = self.memory.state_dict() if self.memory is not None else None
        meta["versions"] = self.versions.state_dict()
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], clients_kept_their_copies: bool) -> None:
        """Continue from :meth:`checkpoint`: the next round started is the restored round.

        ``clients_kept_their_copies``: the clients still hold what they were sent (the standalone
        simulator restores them); cross-silo clients restarted with nothing, so the version table
        starts empty and every client is sent its whole sub-model once.
        """
        self.state.load_state_dict(tensors, meta)
        if self.memory is not None and meta.get("memory") is not None:
            self.memory.load_state_dict(meta["memory"])
        if meta.get("versions") is not None:
            self.versions.load_state_dict(meta["versions"], clients_kept_their_copies)
        self.current = None
