"""The client side of a run, framework-free: receive a broadcast, train as its plan says, upload.

One :class:`Client` may stand for many data silos (the standalone simulator
reuses one process for all of them); what belongs to a silo across rounds,
its error-feedback residual, is kept per silo index.

With ``progfed.client_dropout`` a sampled silo may stay silent
(:func:`~fedml_progfed.engine.dropout.stays_silent`): it trains nothing and answers
with :func:`~fedml_progfed.comm.messages.silent_answer`. The decision is taken here,
under every runtime's adapter, so the same silos are silent in standalone, MPI and gRPC runs.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Iterable, Mapping, Sequence

import torch

from fedml_progfed.algorithms.base import Algorithm, Assignment, LocalResult, RoundPlan
from fedml_progfed.comm.codecs import ErrorFeedback
from fedml_progfed.comm.messages import Header, Message, decode, encode_entries, silent_answer, values_crc
from fedml_progfed.core.staged_model import (
    StagedModel, copy_state, init_stage_modules, load_state, parameter_names, state_shapes,
)
from fedml_progfed.core.seeding import derive_seed
from fedml_progfed.engine.dropout import stays_silent
from fedml_progfed.engine.settings import WireSettings
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.core.private_sgd import planned_steps
from fedml_progfed.privacy import RecordLevelDP
from fedml_progfed.privacy.clip import clip_to_norm

log = logging.getLogger("fedml_progfed")


class Client:
    """Follows the server's plan on a local copy of the staged model.

    Parameters
    ----------
    algorithm
        The run's algorithm (the same on every party).
    model
        A staged model built like the server's.
    wire
        Codecs and seed.
    dropout
        ``progfed.client_dropout``: the probability that a sampled silo stays silent in a round.
    clip_norm
        Client-level DP's ``C`` (the ``clipping_norm`` field): the update, all uploaded tensors as
        one vector, is clipped to this L2 norm before any codec sees it; ``None`` without DP.
    private_secret
        Record-level DP-SGD: the seed its noise and Poisson sampling derive from (per round and
        silo); it stays on this client, so the server cannot subtract the noise.
    private_budget
        Record-level DP with a target epsilon: this client's own accountant per silo. A silo whose
        next round would pass the target trains nothing (the server stops calling it once it has
        its report; this check also covers its first round, whose size only the client knows).
    """

    def __init__(self, algorithm: Algorithm, model: StagedModel, wire: WireSettings, dropout: float = 0.0,
                 clip_norm: float | None = None, private_secret: int | None = None,
                 private_budget: RecordLevelDP | None = None) -> None:
        self.algorithm = algorithm
        self.model = model
        self.wire = wire
        self.dropout = dropout
        self.clip_norm = clip_norm
        #: DP-SGD's noise and sampling seed (record-level DP): this client's alone, never sent.
        self.private_secret = private_secret
        self.private_budget = private_budget
        #: The header of the message last received: what a silent answer answers.
        self.received: Header | None = None
        #: Whether the silo of the last train() stays silent this round.
        self.silent = False
        #: What this client does in the round it received (rebuilt once per broadcast).
        self.assignment: Assignment | None = None
        self.plan: RoundPlan | None = None
        self.client: int | None = None
        #: The model the received round trains (``model``, or a narrower copy of it).
        self.working: StagedModel = model
        self.result: LocalResult | None = None
        self._start: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memories: dict[int, ErrorFeedback] = {}
        #: The last value received of every tensor: what fills a broadcast's cached names
        #: (training changes the model, never these copies).
        self._held: dict[str, torch.Tensor] = {}
        #: Compressed change broadcasts: what each data silo reconstructed from its last message
        #: (the server keeps the same bits), and what the message just received makes of it.
        self._references: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}
        self._received_reference: tuple[int | None, dict[str, torch.Tensor]] | None = None

    def receive(self, wire_message) -> None:
        """Load a broadcast: rebuild the assignment from its header once, seed entering modules, load the tensors."""
        message = Message.unpack(wire_message, what="server broadcast")
        header = message.header
        self.result, self.client, self.silent, self.received = None, None, False, header
        self._received_reference = None
        if header.type == "skip" and header.algorithm == self.algorithm.name:
            # Not chosen this round (its memory budget does not fit): it will answer with a skip.
            self.plan, self.assignment = RoundPlan.from_tag(header.plan), None
            return
        if header.type != "broadcast" or header.algorithm != self.algorithm.name:
            raise InvalidUpdateError(
                f"server broadcast: a {header.type!r} message of algorithm {header.algorithm!r}; this client runs "
                f"{self.algorithm.name!r} (server and clients must use the same progfed_strategy)"
            )
        plan = RoundPlan.from_tag(header.plan, what="server broadcast")
        layout = self.algorithm.layout(self.model, plan)
        if set(header.seeded) != set(layout.seeded):
            raise InvalidUpdateError(
                f"server broadcast: the server derives {list(header.seeded)} from the seed, this client "
                f"{list(layout.seeded)} (server and clients must use the same progfed_send_entering)"
            )
        # The model this round trains: the client's own, or a narrower copy (HeteroFL widths).
        model = self.working = self.algorithm.client_model(self.model, plan)
        model.stage = model.check_stage(plan.stage)
        if layout.seeded:
            # The same seeded initialisation the server's growth used (ProgFed Alg. 1 lines 5-11).
            init_stage_modules(model, plan.stage, self.wire.seed)
        names = layout.sent
        cached = set(header.cached)
        present = [n for n in names if n not in cached]
        if header.client is not None and self.wire.codec_changes is not None:
            values = self._apply_changes(message, model, names, present)
        else:
            values, deltas = decode(
                message, present, parameter_names(model), state_shapes(model), self.wire.codec_down,
                self.wire.down_seed(plan.round), what="server broadcast",
            )
            if deltas:
                raise InvalidUpdateError("server broadcast: a broadcast must carry values, not changes")
            if cached:
                values.update(self._cached(header, names))
            if self.wire.codec_changes is not None:  # a full message: the silo's reconstruction starts afresh
                self._received_reference = (None, {n: values[n].detach().cpu().clone() for n in present})
        # Keys and shapes are checked; the values come from the server, which checked every update.
        load_state(model, values, names, what="server broadcast")
        if self.wire.cache_unchanged:
            self._held.update((n, values[n].detach().clone()) for n in present)
        self.plan, self.assignment = plan, Assignment(plan, layout)
        self._start = copy_state(model, layout.upload)

    def _apply_changes(self, message: Message, model: StagedModel, names: Sequence[str],
                       present: Sequence[str]) -> dict[str, torch.Tensor]:
        """A per-client broadcast on what silo ``header.client`` holds: its changes added to that copy.

        The sums are the very operations the server did to record what this silo holds, so both
        ends keep the same bits; the header's CRCs refuse a message built on another copy.
        """
        header = message.header
        base = self._references.get(header.client, (0, {}))[1]
        what = f"server broadcast to silo {header.client}"
        in_round = set(names)
        missing = [n for n in (*header.changes, *header.cached) if n not in base or n not in in_round]
        if missing:
            raise InvalidUpdateError(
                f"{what}: sends the change of (or leaves out) {missing[:3]}, which this client does not hold or the round "
                f"does not train (a client that restarted holds nothing; restart the server too)")
        for names_, crc, kind in ((header.changes, header.changes_crc, "changes apply to"),
                                  (header.cached, header.cached_crc, "leaves out")):
            if names_ and values_crc(base, names_) != crc:
                raise InvalidUpdateError(f"{what}: this client holds other values of the tensors the message {kind} "
                                         f"(their CRC-32 differs); server and client disagree on what was sent")
        changes = set(header.changes)
        decoded, _ = decode(message, list(present), changes, state_shapes(model), self.wire.codec_changes,
                            self.wire.change_seed(header.round, header.client), what=what)
        values = {n: (base[n] + decoded[n] if n in changes else decoded[n].detach().cpu().clone()) for n in present}
        values.update({n: base[n] for n in header.cached})
        self._received_reference = (header.client, {**base, **values})
        return values

    def reference(self, client: int) -> dict[str, torch.Tensor]:
        """What silo ``client`` reconstructed from its last broadcast (compressed change broadcasts)."""
        return self._references.get(int(client), (0, {}))[1]

    def _cached(self, header: Header, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors the server left out because this client holds them, checked against its CRC."""
        in_round = set(names)
        unknown = [n for n in header.cached if n not in in_round]
        if unknown:
            raise InvalidUpdateError(f"server broadcast: leaves out {unknown[:3]}, which the round's sub-model does not hold")
        missing = [n for n in header.cached if n not in self._held]
        if missing:
            raise InvalidUpdateError(
                f"server broadcast: leaves out {missing[:3]} as held by this client, which never received them "
                f"(a client that restarted holds nothing; set progfed_cache_unchanged false or restart the server too)"
            )
        if values_crc(self._held, header.cached) != header.cached_crc:
            raise InvalidUpdateError(
                "server broadcast: this client holds other values of the tensors the server left out "
                "(their CRC-32 differs); server and client disagree on what was sent"
            )
        return {n: self._held[n] for n in header.cached}

    def hold(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take ``state`` as what this client holds (a resumed standalone run: its silos kept their copies)."""
        self._held = {n: t.detach().to("cpu").clone() for n, t in state.items()}

    def train(self, batches: Iterable, device: torch.device, client: int) -> None:
        """Local training by data silo ``client``; a silo the plan leaves out, or a silent one, trains nothing.

        A silent silo touches neither its data nor any random stream, so the others' updates
        are the same bit for bit with or without dropout.
        """
        if self.plan is None:
            raise InvalidUpdateError("train() called before a broadcast was received: the client has no global model")
        self.client = int(client)
        self.result, self.silent = None, False
        if self._received_reference is not None:
            addressed, reference = self._received_reference
            if addressed is not None and addressed != self.client:
                raise InvalidUpdateError(f"train(): the broadcast was built on what silo {addressed} holds, not silo "
                                         f"{self.client}'s; give each silo its own message")
            round_idx = self.plan.round
            self._references[self.client], self._received_reference = (round_idx, reference), None
            # the server forgets a silo after the history; so does the client (standalone: one copy per silo)
            for silo in [s for s, (held_at, _) in self._references.items() if round_idx - held_at > self.wire.history]:
                del self._references[silo]
        if self.assignment is None or (self.plan.participants is not None and self.client not in self.plan.participants):
            return
        if stays_silent(self.wire.seed, self.plan.round, self.client, self.dropout):
            self.silent = True
            return
        seed = (derive_seed("dp-sgd", self.private_secret, self.plan.round, self.client)
                if self.private_secret is not None else None)
        budget = self.private_budget
        if budget is not None:
            planned = planned_steps(len(batches.dataset), batches.batch_size, self.algorithm.training.sgd.epochs)
            if budget.would_pass(self.client, planned):
                log.warning("round %d: silo %d would pass its target epsilon with this round; it trains nothing",
                            self.plan.round, self.client)
                return
        self.result = self.algorithm.client_update(self.working, self.assignment, batches, device, self.client,
                                                   private_seed=seed)
        if budget is not None:
            budget.charge(self.client, self.result.private)

    def upload(self) -> "OrderedDict[str, torch.Tensor]":
        """The update message: changes since the broadcast (encoded unless the codec is float), a skip or a silent answer."""
        plan, client = self.plan, self.client
        if plan is None or client is None:
            raise InvalidUpdateError("upload requested before training: call receive() and train() first")
        if self.silent:
            return silent_answer(self.received, client)
        common = dict(algorithm=self.algorithm.name, round=plan.round, plan=plan.tag(), client=client)
        if self.result is None:
            return Message(Header(type="skip", kind="values", **common)).pack()
        result = self.result
        names = list(self.assignment.layout.upload)
        # The broadcast was loaded before training moved the model to its device.
        deltas = OrderedDict((n, result.tensors[n] - self._start[n].to(result.tensors[n].device)) for n in names)
        if self.clip_norm is not None:
            # DP-FedAvg's ClipFn (McMahan et al. 2018): the codec encodes the clipped update
            deltas = OrderedDict(clip_to_norm(deltas, self.clip_norm)[0])
        codec = self.wire.codec_up
        params = parameter_names(self.working)
        if codec.spec.lossless and not codec.error_feedback:
            plain, payload, kind = deltas, None, "delta"
        else:
            # Parameters' changes through the codec; buffers and integers exact, as values.
            exact = {n: (result.tensors[n] if n not in params else deltas[n]) for n in names}
            memory = self._memories.setdefault(client, codec.new_memory()) if codec.error_feedback else None
            plain, payload = encode_entries(exact, names, params, codec, self.wire.up_seed(plan.round, client), memory)
            kind = "encoded"
        metrics = {
            "samples": result.samples, "train_loss": result.train_loss, "flops": result.flops, "compute_s": result.compute_s,
        }
        if result.private is not None:  # what the server's accountant charges this client with
            metrics.update(dp_records=result.private.population, dp_steps=result.private.steps,
                           dp_sample_rate=result.private.sample_rate)
        header = Header(type="update", kind=kind, codec=codec.spec.text, metrics=metrics, **common)
        return Message(header, plain, payload).pack()

    def memory_state(self) -> dict[int, dict[str, torch.Tensor]]:
        """Error-feedback residuals per data silo (what a standalone checkpoint keeps of the clients)."""
        return {client: memory.state_dict() for client, memory in self._memories.items()}

    def load_memory_state(self, state: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Restore :meth:`memory_state` (a resumed standalone run)."""
        self._memories = {}
        for client, residuals in state.items():
            memory = self.wire.codec_up.new_memory()
            memory.load_state_dict(residuals)
            self._memories[int(client)] = memory

