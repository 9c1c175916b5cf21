"""Who may tell this party what: identity, run and freshness checks on every decoded gRPC message.

A message reaches FedML's handlers only when :meth:`Guard.judge` finds nothing wrong
with it; otherwise it is dropped with one log line and counted (the server writes the
reasons into ``metrics.csv``). The checks, in order:

1. it is for this job (run id) and this party (receiver);
2. its sender is another rank of the ip-config, and with TLS the rank its verified
   certificate names (a party holding rank 2's certificate cannot speak as rank 1);
3. a client hears only the server, and only models no older than the last one;
4. the server takes an update only from a rank it sent a model to, for exactly the
   round and data silo of that model, once (a replay, a late straggler, an update for
   a silo that rank was not given, or a second answer is dropped), and a ``FINISHED``
   status only after that rank was sent the final model.

The guard is plain bookkeeping (no sockets), so each rule is tested directly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable

from fedml_progfed.comm.envelope import Envelope
from fedml_progfed.fedml_plugin.comm import (
    ABORT, C2S_CLIENT_STATUS, C2S_SEND_MODEL, CLIENT_STATUS, FINISHED, S2C_INIT_CONFIG, S2C_SYNC_MODEL,
)

#: FedML's server-to-client messages besides models: check status (6) and finish (7).
S2C_CHECK_STATUS, S2C_FINISH = 6, 7
_FROM_SERVER = (S2C_INIT_CONFIG, S2C_SYNC_MODEL, S2C_CHECK_STATUS, S2C_FINISH, ABORT)
_FROM_CLIENT = (C2S_SEND_MODEL, C2S_CLIENT_STATUS, ABORT)


@dataclass
class Asked:
    """The last model the server sent one rank: its round, the data silo it trains, whether it ends the run."""

    round: int | None
    silo: int | None
    final: bool
    answered: bool = False
    silent: bool = False  # answered by the round deadline, not by the rank


class Guard:
    """Judges decoded messages for one party (see the module docstring); thread-safe.

    Parameters
    ----------
    rank
        This party's rank (0: the server).
    ranks
        Every rank of the job (the ip-config's).
    run_id
        The job's run id; every message must carry it.
    authenticated
        True with mutual TLS: the caller's certificate names its rank.
    """

    def __init__(self, rank: int, ranks: Iterable[int], run_id: str, authenticated: bool) -> None:
        self.rank, self.ranks, self.run_id, self.authenticated = rank, frozenset(ranks), str(run_id), authenticated
        self._asked: dict[int, Asked] = {}
        self._newest_model: int | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- the server's record of what it asked

    def asked(self, receiver: int, round_: int | None, silo: int | None, final: bool) -> None:
        """The server sent ``receiver`` a model of ``round_`` for data silo ``silo`` (``final``: the run's last)."""
        with self._lock:
            self._asked[receiver] = Asked(round_, silo, final)

    def pending(self) -> dict[int, Asked]:
        """Ranks whose last model is not answered yet."""
        with self._lock:
            return {r: a for r, a in self._asked.items() if not a.answered}

    def last_asked(self, rank: int) -> Asked | None:
        with self._lock:
            return self._asked.get(rank)

    def asked_in(self, round_: int | None) -> dict[int, Asked]:
        """Every rank's last model, for those sent a model of ``round_``."""
        with self._lock:
            return {r: Asked(**vars(a)) for r, a in self._asked.items() if a.round == round_}

    def answer_for(self, rank: int) -> bool:
        """The round deadline answers for ``rank`` (silent); False when the rank answered meanwhile."""
        with self._lock:
            asked = self._asked.get(rank)
            if asked is None or asked.answered:
                return False
            asked.answered = asked.silent = True
            return True

    # ---------------------------------------------------------------- judging one message

    def judge(self, envelope: Envelope, identity: int | None) -> str | None:
        """Why ``envelope`` must be dropped, or ``None`` when it may go to FedML.

        ``identity`` is the rank the caller's verified certificate names (``None`` without TLS).
        Accepting an update or a ``FINISHED`` status marks the rank's model answered.
        """
        sender = envelope.sender
        if envelope.run != self.run_id:
            return f"it belongs to run {envelope.run!r}, this job is run {self.run_id!r}"
        if envelope.receiver != self.rank:
            return f"it is addressed to rank {envelope.receiver}, this party is rank {self.rank}"
        if sender not in self.ranks or sender == self.rank:
            return f"it claims sender {sender}, which is not another rank of this job"
        if self.authenticated and identity != sender:
            held = "no rank certificate" if identity is None else f"the certificate of rank {identity}"
            return f"it claims sender {sender} but its caller holds {held}"
        if self.rank != 0:
            return self._judge_at_client(envelope)
        return self._judge_at_server(envelope)

    def _judge_at_client(self, envelope: Envelope) -> str | None:
        if envelope.sender != 0:
            return f"clients hear only the server, not rank {envelope.sender}"
        if envelope.type not in _FROM_SERVER:
            return f"message type {envelope.type!r} is not one the server sends"
        if envelope.type in (S2C_INIT_CONFIG, S2C_SYNC_MODEL) and envelope.round is not None:
            with self._lock:
                if self._newest_model is not None and envelope.round < self._newest_model:
                    return f"a model of round {envelope.round}, older than round {self._newest_model} already received"
                self._newest_model = envelope.round
        return None

    def _judge_at_server(self, envelope: Envelope) -> str | None:
        sender, kind = envelope.sender, envelope.type
        if kind not in _FROM_CLIENT:
            return f"message type {kind!r} is not one a client sends"
        if kind == ABORT:
            return None
        with self._lock:
            asked = self._asked.get(sender)
            if kind == C2S_CLIENT_STATUS:
                if envelope.params.get(CLIENT_STATUS) != FINISHED:
                    return None  # ONLINE: a party (re)registering
                if asked is None or not asked.final:
                    return f"rank {sender} says FINISHED before it was sent the final model"
                asked.answered = True
                return None
            if asked is None:
                return f"an update from rank {sender}, which was sent no model"
            if asked.final:
                return f"an update from rank {sender} answering the final model (the run is over)"
            if (envelope.round, envelope.client) != (asked.round, asked.silo):
                return (f"an update for round {envelope.round} (silo {envelope.client}) from rank {sender}, which was "
                        f"last sent round {asked.round} (silo {asked.silo}): a replay, a late answer or a forgery")
            if asked.answered:
                late = " after the round deadline left it out" if asked.silent else ""
                return f"a second update for round {asked.round} from rank {sender}{late}"
            asked.answered = True
            return None
