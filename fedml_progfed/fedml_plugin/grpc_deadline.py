"""The server's round deadline (``progfed_round_deadline_s``): a silo that goes quiet does not stop the federation.

FedML's cross-silo server waits for an update from every rank it sent a model to and
sends each model synchronously, so one stopped silo stops the job. With a deadline:

- every model leaves through a per-rank :class:`Courier` thread; a newer model for a
  rank replaces one still waiting, and a rank that is stopped or gone blocks nobody;
- :class:`RoundDeadline` checks, every half second, the round whose models went out
  last: once the deadline has passed and at least ``progfed_min_clients`` ranks
  answered, it answers for each silent rank with a *silent* update
  (:func:`~fedml_progfed.comm.messages.silent_answer`), which the engine records in
  ``silent_clients`` and leaves out of the mean; for the final model it answers with a
  ``FINISHED`` status so the server can write its results. Below quorum it waits, and
  the round timeout (``progfed_round_timeout_s``) ends the job naming who is missing;
- the next round goes to every rank again; a rank that comes back takes part (its
  late answer to a closed round is dropped by the guard as a late answer).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Protocol

import grpc
from fedml.core.distributed.communication.message import Message

from fedml_progfed.fedml_plugin.comm import (
    C2S_CLIENT_STATUS, C2S_SEND_MODEL, CLIENT_STATUS, FINISHED, MODEL_PARAMS, S2C_INIT_CONFIG, S2C_SYNC_MODEL,
)

log = logging.getLogger("fedml_progfed")
NUM_SAMPLES = "num_samples"


class ServerComm(Protocol):
    """What the deadline uses of the server's comm manager (:class:`~fedml_progfed.fedml_plugin.grpc_comm.ProgFedGRPCCommManager`)."""

    dialer: Any  # deliver(receiver, body, timeout) -> bytes sent
    guard: Any  # what each rank was asked and whether it answered
    inbox: Any  # .queue: where stand-ins join the received messages
    options: Any  # round_timeout_s, meter
    watch: Any  # has_heard(rank)

    def _describe(self, rank: int) -> str: ...

    def last_model(self, rank: int) -> Any: ...


class Courier(threading.Thread):
    """Delivers one rank's messages in order, in the background; a newer model replaces a queued older one.

    A rank that does not take a message within the round timeout (stopped) is tried again
    until a newer model replaces it; a rank whose port refuses (gone) loses what is queued:
    when it starts again it registers, and the server sends it the current model then.
    """

    def __init__(self, comm: ServerComm, receiver: int) -> None:
        super().__init__(name=f"progfed-courier-{receiver}", daemon=True)
        self.comm, self.receiver = comm, receiver
        self._queue: collections.deque[tuple[bytes, bool, str]] = collections.deque()
        self._ready = threading.Condition()
        self._halt = False
        self._quiet = False  # one log line per outage

    def post(self, body: bytes, is_model: bool, what: str) -> None:
        with self._ready:
            if is_model:
                self._queue = collections.deque(item for item in self._queue if not item[1])
            self._queue.append((body, is_model, what))
            self._ready.notify()

    def stop(self) -> None:
        with self._ready:
            self._halt = True
            self._ready.notify()

    def run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._halt:
                    self._ready.wait()
                if self._halt:
                    return
                body, _, what = self._queue[0]
            delivered, gone = self._try(body, what)
            with self._ready:
                if gone:  # what is queued for a gone rank is lost: when it starts again it registers
                    self._queue.clear()
                elif delivered and self._queue and self._queue[0][0] is body:
                    self._queue.popleft()
                # otherwise the message stays first and is tried again, unless a newer model replaced it
            if gone:
                self._halt_or_wait(1.0)  # a gone rank's port refuses at once: do not spin

    def _halt_or_wait(self, seconds: float) -> None:
        with self._ready:
            self._ready.wait_for(lambda: self._halt, seconds)

    def _try(self, body: bytes, what: str) -> tuple[bool, bool]:
        """(delivered, the rank is gone)."""
        try:
            size = self.comm.dialer.deliver(self.receiver, body, self.comm.options.round_timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            gone = code == grpc.StatusCode.UNAVAILABLE
            if not self._quiet and self.comm.watch.has_heard(self.receiver):  # before its first word it is starting
                state = "is gone" if gone else "does not take messages"
                log.warning("%s %s (%s while sending %s); it stays silent until it answers again",
                            self.comm._describe(self.receiver), state, getattr(code, "name", code), what)
                self._quiet = True
            return False, gone
        self._quiet = False
        if self.comm.options.meter is not None:
            self.comm.options.meter.sent(size)
        return True, False


class RoundDeadline:
    """The server's deadline per round (see the module docstring).

    Parameters
    ----------
    comm
        The server's comm manager (its guard knows what each rank was asked and whether it answered).
    deadline_s
        Seconds from a round's first model to the point where the silent are left out.
    min_clients
        Answers the round needs before the deadline may close it.
    """

    def __init__(self, comm: ServerComm, deadline_s: float, min_clients: int, tick_s: float = 0.5) -> None:
        self.comm, self.deadline_s, self.min_clients, self.tick_s = comm, deadline_s, min_clients, tick_s
        self._couriers: dict[int, Courier] = {}
        self._round: Any = None
        self._opened = 0.0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="progfed-round-deadline", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        for courier in self._couriers.values():
            courier.stop()

    def post(self, receiver: int, msg: Any, body: bytes) -> None:
        """Queue ``msg`` (encoded as ``body``) for ``receiver``; a model of a new round starts that round's clock."""
        is_model = msg.get_type() in (S2C_INIT_CONFIG, S2C_SYNC_MODEL)
        if is_model:
            asked = self.comm.guard.last_asked(receiver)
            if asked is not None and asked.round != self._round:
                self._round, self._opened = asked.round, time.monotonic()
        if receiver not in self._couriers:
            self._couriers[receiver] = Courier(self.comm, receiver)
            self._couriers[receiver].start()
        what = f"the model of round {self._round}" if is_model else f"message type {msg.get_type()}"
        self._couriers[receiver].post(body, is_model, what)

    def _watch(self) -> None:
        while not self._halt.wait(self.tick_s):
            self.close_if_due(time.monotonic())

    def close_if_due(self, now: float) -> list[int]:
        """Answer for the silent ranks of the current round if its deadline passed with a quorum; returns them."""
        round_ = self._round
        if round_ is None or now - self._opened < self.deadline_s:
            return []
        asked = self.comm.guard.asked_in(round_)
        silent = sorted(r for r, a in asked.items() if not a.answered)
        if not silent:
            return []
        final = any(a.final for a in asked.values())
        answered = sum(1 for a in asked.values() if a.answered and not a.silent)
        if not final and answered < self.min_clients:
            return []  # below quorum: the round timeout decides
        closed = [r for r in silent if self.comm.guard.answer_for(r)]
        for rank in closed:
            self.comm.inbox.queue.put(self._stand_in(rank, round_, final))
        if closed:
            log.warning("round %s: %s sent nothing within progfed_round_deadline_s (%g s); %s", round_,
                        ", ".join(self.comm._describe(r) for r in closed), self.deadline_s,
                        "the run ends without them" if final else
                        f"the round goes on with the {answered} that answered")
        return closed

    def _stand_in(self, rank: int, round_: Any, final: bool) -> Message:
        """What a silent rank would have sent: a silent update, or for the final model its FINISHED status."""
        if final:
            msg = Message(C2S_CLIENT_STATUS, rank, 0)
            msg.add_params(CLIENT_STATUS, FINISHED)
            return msg
        from fedml_progfed.comm.messages import silent_answer

        model = self.comm.last_model(rank)
        msg = Message(C2S_SEND_MODEL, rank, 0)
        msg.add_params(MODEL_PARAMS, silent_answer(model.get(MODEL_PARAMS), int(model.get("client_idx"))))
        msg.add_params(NUM_SAMPLES, 0)
        return msg
