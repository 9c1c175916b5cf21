"""What our FedML comm managers add to FedML's: a blocking receive loop, deadlines, abort notices, devices.

Our transports (:mod:`~fedml_progfed.fedml_plugin.grpc_comm`,
:mod:`~fedml_progfed.fedml_plugin.mpi_comm`) build on this module, and
:func:`~fedml_progfed.fedml_plugin.install.comm_managers_installed` puts them
where FedML's runtime looks for its own; :class:`WatchedComm` is the part both share:

- the receive loop blocks on its queue (FedML's gRPC loop spins a core, MPI's
  wakes 10 000 times a second);
- every model the server sends and every status a client sends starts a
  deadline (:class:`~fedml_progfed.fedml_plugin.watch.PeerWatch`), checked by a
  watchdog thread that ends the job through the runtime's ``fatal`` callback;
- an abort notice (message type :data:`ABORT`, sent by the runtime's ``fatal``) ends
  the receiving party with an error naming the party at fault;
- clients report their torch device once, so the server can write it per rank;
- a client sets FedML's round count from the server's first model (``rounds_left``), so a
  job the server resumed from a checkpoint needs nothing from the clients.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from fedml_progfed.errors import PeerError
from fedml_progfed.fedml_plugin.watch import PeerWatch, Watchdog

log = logging.getLogger("fedml_progfed")

#: Our message type: "this job ends", with the reason (FedML's handlers never see it).
ABORT = "progfed_abort"
ABORT_REASON = "progfed_reason"
#: Parameter of a client's status message: its torch device.
DEVICE = "progfed_device"

# FedML's cross-silo message types (fedml/cross_silo/{server,client}/message_define.py).
S2C_INIT_CONFIG, S2C_SYNC_MODEL = 1, 2
C2S_SEND_MODEL, C2S_CLIENT_STATUS = 3, 5
CLIENT_STATUS = "client_status"
MODEL_PARAMS = "model_params"
FINISHED = "FINISHED"
#: Parties wait at least this long for each other at start-up (see CommOptions.startup_timeout_s).
MIN_STARTUP_TIMEOUT_S = 300.0


class WireMeter:
    """Bytes that crossed the transport, as the server's engine asks for them once per round.

    The server's :class:`~fedml_progfed.engine.server.Server` calls :meth:`take_round` when it
    records a round: everything sent (down) and received (up) since the previous call.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down = self._up = 0
        self.total_down = self.total_up = 0
        self._rejected: list[str] = []
        self.total_rejected = 0

    def sent(self, nbytes: int) -> None:
        with self._lock:
            self._down += nbytes
            self.total_down += nbytes

    def received(self, nbytes: int) -> None:
        with self._lock:
            self._up += nbytes
            self.total_up += nbytes

    def rejected(self, reason: str) -> None:
        """A message the transport dropped before FedML saw it (forged, stale, malformed), and why."""
        with self._lock:
            self._rejected.append(reason)
            self.total_rejected += 1

    def take_round(self) -> dict[str, int | str]:
        with self._lock:
            columns: dict[str, int | str] = {
                "wire_bytes_down": self._down, "wire_bytes_up": self._up,
                "rejected_messages": len(self._rejected),
                # one line per row: reasons joined, each cut short (a flood must not bloat the CSV)
                "rejected_reasons": " | ".join(dict.fromkeys(r[:160] for r in self._rejected)),
            }
            self._down = self._up = 0
            self._rejected = []
        return columns


@dataclass
class CommOptions:
    """What a run hands its comm managers.

    round_timeout_s: the server's wait for a client's reply (``None``: forever); a client waits
    for its server twice as long (the server may wait a full round for the slowest client, then
    aggregates and tests).
    fatal: ends the process (prints the error, tells the peers, exits); never returns.
    device: this process's torch device, reported to the server.
    meter: counts wire bytes (the server's, where the transport lets us see them).
    rounds_left: a client's rounds to run, read from the server's first model (``None``: FedML's
    ``comm_round`` stands). FedML's client ends on the model after its last counted round, so it must
    count exactly the rounds the server will run, which after a server-side resume is fewer.
    """

    round_timeout_s: float | None
    fatal: Callable[[BaseException], None]
    device: str = "cpu"
    meter: WireMeter | None = None
    poll_s: float = 0.5
    created: list = field(default_factory=list)  # the managers FedML built (their devices per rank)
    rounds_left: Callable[[Any], int | None] | None = None

    @property
    def server_timeout_s(self) -> float | None:
        return None if self.round_timeout_s is None else 2 * self.round_timeout_s

    @property
    def startup_timeout_s(self) -> float | None:
        """How long parties wait for each other to come up: imports and data loading take
        minutes on a busy machine, so never less than :data:`MIN_STARTUP_TIMEOUT_S`."""
        return None if self.round_timeout_s is None else max(self.round_timeout_s, MIN_STARTUP_TIMEOUT_S)


class WatchedComm:
    """Mixin for a FedML ``BaseCommunicationManager``: see the module docstring.

    The transport subclass provides ``_next_message(timeout)`` (a received FedML
    ``Message``; ``queue.Empty`` after ``timeout``), ``_running()``, ``_describe(rank)`` and, optionally, ``_probe(rank)``; it calls :meth:`_after_send` after every send.
    """

    options: CommOptions
    watch: PeerWatch
    devices: dict[int, str]

    def _setup_watch(self, rank: int, size: int, options: CommOptions) -> None:
        self.my_rank, self.world_clients, self.options = rank, size, options
        self.watch = PeerWatch(self._describe)
        self.devices = {rank: options.device}
        self._models_sent: dict[int, int] = {}
        self._models_received = 0
        self._watchdog: Watchdog | None = None
        options.created.append(self)

    # ---------------------------------------------------------------- sending side

    def _after_send(self, msg: Any) -> None:
        """A message left: the receiver now owes a reply (server: to a model; client: to a status or update)."""
        receiver = int(msg.get_receiver_id())
        kind = msg.get_type()
        if self.my_rank == 0 and kind in (S2C_INIT_CONFIG, S2C_SYNC_MODEL):
            count = self._models_sent[receiver] = self._models_sent.get(receiver, 0) + 1
            self.watch.expect(receiver, f"no reply to the model of round {count - 1}", self.options.round_timeout_s)
        elif self.my_rank != 0 and kind in (C2S_SEND_MODEL, C2S_CLIENT_STATUS):
            if kind == C2S_CLIENT_STATUS and msg.get(CLIENT_STATUS) == FINISHED:
                self.watch.clear()  # the run is over for this client
            elif kind == C2S_SEND_MODEL:
                self.watch.expect(0, "no model after this client's update", self.options.server_timeout_s)
            elif not self._models_received:  # the server starts when every client is online
                self.watch.expect(0, "no first model after this client came online", _add(
                    self.options.startup_timeout_s, self.options.server_timeout_s))

    def _stamp_device(self, msg: Any) -> None:
        if self.my_rank != 0 and msg.get_type() == C2S_CLIENT_STATUS:
            msg.add_params(DEVICE, self.options.device)

    # ---------------------------------------------------------------- receiving side

    def _start_watching(self) -> None:
        if self.my_rank == 0:
            for rank in range(1, self.world_clients + 1):
                self.watch.expect(rank, "it never came online", self.options.startup_timeout_s)
        self._watchdog = Watchdog(self.watch, self.options.fatal, self._liveness_probe())
        self._watchdog.start()

    def _liveness_probe(self) -> Any:
        """``rank -> PeerError | None`` for the watchdog, or ``None``: the transport's ``_probe`` if it has one."""
        return getattr(self, "_probe", None)

    def _stop_watching(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()

    def _receive_loop(self) -> None:
        """Block on the queue (no spinning) and hand each message to FedML's observers."""
        self._start_watching()
        try:
            while self._running():
                try:
                    msg = self._next_message(self.options.poll_s)
                except queue.Empty:
                    continue
                if msg is not None:  # None: the transport dropped what it took
                    self._dispatch(msg)
        finally:
            self._stop_watching()

    def _dispatch(self, msg: Any) -> None:
        sender = int(msg.get_sender_id())
        self.watch.heard(sender)
        if msg.get_type() == ABORT:
            raise PeerError(f"{self._describe(sender)} ended the job: {msg.get(ABORT_REASON)}", peer=sender)
        if msg.get_type() in (S2C_INIT_CONFIG, S2C_SYNC_MODEL):
            self._models_received += 1
        if msg.get_type() == S2C_INIT_CONFIG and self.my_rank != 0 and self.options.rounds_left is not None:
            rounds = self.options.rounds_left(msg.get(MODEL_PARAMS))
            for observer in self._observers if rounds is not None else ():
                if hasattr(observer, "num_rounds"):  # FedML's ClientMasterManager
                    observer.num_rounds = rounds
            self._first_round = _header_round(msg.get(MODEL_PARAMS))
        elif msg.get_type() == S2C_SYNC_MODEL and self.my_rank != 0:
            self._count_rounds_from(msg.get(MODEL_PARAMS))
        if msg.get(DEVICE) is not None:
            self.devices[sender] = str(msg.get(DEVICE))
        self.notify(msg)  # FedML's observers (its server or client manager)

    def _count_rounds_from(self, wire: Any) -> None:
        """FedML's client counts the models it trained; a silo left out of rounds (stopped, restarted) would
        count too few and train past the end. Its count is the server's round minus the round it started in."""
        round_, first = _header_round(wire), getattr(self, "_first_round", None)
        if round_ is None or first is None:
            return
        for observer in self._observers:
            if hasattr(observer, "round_idx") and hasattr(observer, "num_rounds"):  # FedML's ClientMasterManager
                observer.round_idx = round_ - first

    # transport hooks
    def _next_message(self, timeout: float) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _running(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _describe(self, rank: int) -> str:
        return "the server (rank 0)" if rank == 0 else f"client rank {rank}"


def _header_round(wire: Any) -> int | None:
    """The round in our header of a model message (``None`` for a message that is not ours)."""
    from fedml_progfed.comm.messages import HEADER_KEY, Header

    if not isinstance(wire, Mapping) or HEADER_KEY not in wire:
        return None
    return Header.from_tensor(wire[HEADER_KEY], "the server's model").round


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


class OwnTransport:
    """FedML's observer interface for the comm managers that replace FedML's whole transport (gRPC, MQTT_S3).

    The MPI manager keeps FedML's class, which has these already.
    """

    _observers: list

    def add_observer(self, observer: Any) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: Any) -> None:
        self._observers.remove(observer)

    def notify(self, message: Any) -> None:
        for observer in self._observers:
            observer.receive_message(message.get_type(), message)

    def _announce_ready(self, rank: int) -> None:
        """FedML's first event: the connection is ready (message type 0), before the receive loop starts."""
        from fedml.core.distributed.communication.message import Message

        ready = Message(0, rank, rank)  # FedML's MSG_TYPE_CONNECTION_IS_READY
        for observer in self._observers:
            observer.receive_message(0, ready)
