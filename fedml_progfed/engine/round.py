"""One round as the server starts it: the plan, its layout, an assignment and a message per client.

Built once, by :meth:`fedml_progfed.engine.server.Server.start_round`, and read by
everything after it: the runtimes (who is called, what each is sent), the update
checks (what each client had to upload), the merge (which names change) and the
ledger (bytes each client was sent). Nobody recomputes what it holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

from fedml_progfed.algorithms.base import Assignment, Layout, RoundPlan
from fedml_progfed.comm.messages import nbytes


@dataclass
class Round:
    """A started round (see the module docstring).

    Attributes
    ----------
    plan
        What the round trains, as the server decided.
    layout
        The names of the plan on the server's model (computed once).
    default
        The assignment of every client the runtime calls that has no entry of its own
        in ``assignments`` (FedML's sampled clients when the plan names no participants).
    num_clients
        Client ids are ``0..num_clients-1``.
    assignments
        Per-client assignments, where a client's differs from ``default`` or it was chosen
        by name. A client mapped to ``None`` is called but does not train (its memory does not fit).
    default_message
        The encoded message of the default assignment with every tensor in it.
    messages
        A client's own message where it differs from ``default_message`` (it holds some
        tensors already); clients with the same message share one encoded object.
    skip
        The few-byte notice a client that does not train gets.
    per_client
        Whether the runtime must send a different message to each client (a dict of messages).
    versions
        The versions of the broadcast's tensors this round (empty when nothing is cached).
    columns
        The round's memory columns (``eligible_clients``, ``peak_mem_mb``).
    seeded_params
        Parameters of the sub-model clients derive from the seed instead of receiving.
    """

    plan: RoundPlan
    layout: Layout
    default: Assignment
    num_clients: int
    assignments: Mapping[int, Assignment | None] = field(default_factory=dict)
    default_message: Any = None
    messages: Mapping[int, Any] = field(default_factory=dict)
    skip: Any = None
    per_client: bool = False
    versions: Mapping[str, int] = field(default_factory=dict)
    columns: Mapping[str, Any] = field(default_factory=dict)
    seeded_params: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def participants(self) -> tuple[int, ...] | None:
        """The data silos that train, when the plan names them (memory budgets); else the runtime samples."""
        return self.plan.participants

    def assignment(self, client: int) -> Assignment | None:
        """What ``client`` runs this round; ``None`` for a client that is called but does not train."""
        return self.assignments.get(client, self.default)

    def message(self, client: int) -> Any:
        """The wire message ``client`` is sent."""
        if self.assignment(client) is None:
            return self.skip
        return self.messages.get(client, self.default_message)

    def bytes_to(self, client: int) -> int:
        """Bytes ``client`` was sent this round (its ``bytes_down``)."""
        return nbytes(self.message(client))

    @property
    def full_message_bytes(self) -> int:
        """Bytes of the default assignment's whole message (what a client holding nothing gets)."""
        return nbytes(self.default_message)

    @cached_property
    def wire(self) -> Any:
        """What the runtime sends: one shared message, or ``{client: message}`` when they differ."""
        if not self.per_client:
            return self.default_message
        return {client: self.message(client) for client in range(self.num_clients)}
