"""Our gRPC transport for FedML's cross-silo runtime: mutual TLS, no pickle on the wire, checked senders.

FedML 0.9.6's ``GRPCCommManager`` (``core/distributed/communication/grpc/``) binds an
insecure port, ``pickle.loads`` every request body before anything else (bytes from the
network that run code), trusts the sender a message claims, polls its queue in a loop
that spins a core, and sends without deadlines. :class:`ProgFedGRPCCommManager` keeps
FedML's service definition (``CommRequest``), ip-config and observer interface and
replaces the rest:

- messages travel as :mod:`~fedml_progfed.comm.envelope` bodies (a JSON header plus raw
  tensors); a pickle, random bytes or an oversized body is refused with one log line
  naming the connection, and nothing from the wire is executed;
- with TLS material (``fedml-progfed provision``) every party requires its callers'
  certificates, signed by the federation's CA, and a caller's certificate must name the
  rank its messages claim; a sender also checks that the party it dials holds the
  certificate of the rank it means to reach;
- :class:`~fedml_progfed.fedml_plugin.grpc_guard.Guard` drops messages of another run,
  replays, late answers and updates nobody asked for, before FedML sees them;
- the port is bound without ``SO_REUSEPORT``: a second process for a running rank fails
  at start-up with one error instead of splitting the job's messages;
- the loop blocks on the queue; sends have deadlines; failures name the peer;
- with ``progfed_round_deadline_s`` the server does not wait for silent silos
  (:mod:`~fedml_progfed.fedml_plugin.grpc_deadline`) and takes back silos that return.

Bytes are metered as they cross gRPC: the protobuf ``CommRequest`` plus gRPC's 5-byte
message prefix. HTTP/2 frames, TLS records and TCP/IP are below what Python sees. The
ip-config, settings and dialing live in :mod:`~fedml_progfed.fedml_plugin.grpc_dial`.
"""

from __future__ import annotations

import logging
import queue
import secrets
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Mapping

import grpc
from fedml.core.distributed.communication.base_com_manager import BaseCommunicationManager
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2, grpc_comm_manager_pb2_grpc
from fedml.core.distributed.communication.message import Message

from fedml_progfed.comm.envelope import RefusedMessage, decode, encode
from fedml_progfed.errors import PeerError
from fedml_progfed.fedml_plugin.comm import (
    ABORT, ABORT_REASON, C2S_CLIENT_STATUS, CLIENT_STATUS, FINISHED, MODEL_PARAMS, S2C_INIT_CONFIG, S2C_SYNC_MODEL, CommOptions,
    OwnTransport, WatchedComm,
)
from fedml_progfed.fedml_plugin.grpc_dial import (
    GRPC_MESSAGE_PREFIX, Dialer, Endpoint, GRPCSettings, bind_error,
)
from fedml_progfed.fedml_plugin.grpc_guard import S2C_FINISH, Guard
from fedml_progfed.fedml_plugin.grpc_tls import peer_rank

log = logging.getLogger("fedml_progfed")

#: How long a party gives a peer that sent an unauthenticated abort notice to exit (a real one exits at once).
ABORT_CHECK_S = 5.0
ONLINE = "ONLINE"
#: Parameter of a client's status: a token of its process, so the server tells a restarted silo from a repeat.
INCARNATION = "progfed_incarnation"
_INCARNATION = secrets.token_hex(8)


@dataclass(frozen=True)
class Arrival:
    """One request as the servicer took it: who called (address, certified rank) and the body."""

    peer: str
    identity: int | None
    body: bytes
    size: int


class _Inbox(grpc_comm_manager_pb2_grpc.gRPCCommManagerServicer):
    """FedML's service, taking bodies as bytes with the caller's address and certificate (decoding comes later)."""

    def __init__(self, authenticated: bool) -> None:
        self.authenticated = authenticated
        self.queue: queue.Queue[Arrival | Message] = queue.Queue()

    def sendMessage(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - FedML's service name
        identity = peer_rank(context) if self.authenticated else None
        self.queue.put(Arrival(context.peer(), identity, bytes(request.message), request.ByteSize() + GRPC_MESSAGE_PREFIX))
        return grpc_comm_manager_pb2.CommResponse()


class ProgFedGRPCCommManager(OwnTransport, WatchedComm, BaseCommunicationManager):
    """FedML's gRPC comm manager, made safe on an open network (see the module docstring).

    Parameters
    ----------
    grpc_ipconfig_path, topic, client_rank, client_num, args
        As FedML's ``GRPCCommManager`` (FedML's runtime passes them).
    options
        Deadlines, the ``fatal`` callback, device and meter (:class:`~fedml_progfed.fedml_plugin.comm.CommOptions`).
    settings
        Endpoints, run id, message bound, TLS material, round deadline (:class:`GRPCSettings`).
    """

    def __init__(
        self,
        grpc_ipconfig_path: str,
        topic: str = "fedml",
        client_rank: int = 0,
        client_num: int = 0,
        args: Any = None,
        *,
        options: CommOptions,
        settings: GRPCSettings,
    ) -> None:
        # FedML's attributes that its managers and our runners read
        self._topic, self._observers = topic, []
        self.grpc_ipconfig_path, self.args = grpc_ipconfig_path, args
        self.client_rank = self.client_id = int(client_rank)
        self.client_num = int(client_num)
        self.node_type = "server" if self.client_rank == 0 else "client"
        self.settings = settings
        self.endpoints = dict(settings.endpoints)
        self.dialer = Dialer(self.client_rank, settings)
        self.guard = Guard(self.client_rank, self.endpoints, settings.run_id, authenticated=settings.tls is not None)
        self.deadline = None
        self._setup_watch(self.client_rank, self.client_num, options)
        self._last_model: dict[int, Message] = {}
        self._started = False  # the server sent its first models (an ONLINE after that is a silo coming back)
        self._lock = threading.Lock()
        self._checking: set[int] = set()  # ranks whose unauthenticated abort notice is being checked
        self._finished: set[int] = set()  # clients that said FINISHED
        self._incarnations: dict[int, Any] = {}  # each client process's token: a new one is a restart
        self.inbox = _Inbox(authenticated=settings.tls is not None)
        self.grpc_server = self._listen()
        self.is_running = True
        if self.client_rank == 0 and settings.deadline_s is not None:
            from fedml_progfed.fedml_plugin.grpc_deadline import RoundDeadline

            self.deadline = RoundDeadline(self, settings.deadline_s, settings.min_clients)

    def _listen(self) -> grpc.Server:
        own = self.endpoints[self.client_rank]
        limit = self.settings.max_message_bytes
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max(4, len(self.endpoints))),
            options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
                     ("grpc.so_reuseport", 0)],
        )
        grpc_comm_manager_pb2_grpc.add_gRPCCommManagerServicer_to_server(self.inbox, server)
        address = f"{own.host}:{own.port}"
        try:
            if self.settings.tls is not None:
                bound = server.add_secure_port(address, self.settings.tls.server_credentials())
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError as exc:  # newer gRPC raises where older returned 0
            raise bind_error(own, str(exc)) from None
        if not bound:
            raise bind_error(own, "the address is in use or not this machine's")
        server.start()
        return server

    # ---------------------------------------------------------------- FedML's interface

    def handle_receive_message(self) -> None:
        """FedML's order: tell the observers the connection is ready, then run the (blocking) receive loop."""
        self._announce_ready(self.client_rank)
        if self.deadline is not None:
            self.deadline.start()
        self._receive_loop()

    def stop_receive_message(self) -> None:
        self.is_running = False
        if self.deadline is not None:
            self.deadline.stop()
        self.grpc_server.stop(None)

    # ---------------------------------------------------------------- receiving

    def _running(self) -> bool:
        return self.is_running

    def _next_message(self, timeout: float) -> Any:
        """The next message that passed every check (``None`` when the one taken was dropped)."""
        arrival = self.inbox.queue.get(timeout=timeout)
        if isinstance(arrival, Message):  # made here: the deadline's stand-in for a silent silo
            return arrival
        if self.options.meter is not None:
            self.options.meter.received(arrival.size)
        try:
            envelope = decode(arrival.body, self.settings.max_message_bytes)
        except RefusedMessage as exc:
            return self._drop(arrival, str(exc))
        reason = self.guard.judge(envelope, arrival.identity)
        if reason is not None:
            return self._drop(arrival, reason, envelope.sender)
        msg = Message(envelope.type, envelope.sender, envelope.receiver)
        for key, value in envelope.params.items():
            msg.add_params(key, value)
        return msg

    def _drop(self, arrival: Arrival, reason: str, claimed: int | None = None) -> None:
        who = f"rank {arrival.identity} (certified)" if arrival.identity is not None else "an uncertified caller"
        claim = f", claiming rank {claimed}" if claimed is not None and claimed != arrival.identity else ""
        log.warning("dropped a message from %s at %s%s: %s", who, arrival.peer, claim, reason)
        if self.options.meter is not None:
            self.options.meter.rejected(reason)
        return None

    def _dispatch(self, msg: Any) -> None:
        kind, sender = msg.get_type(), int(msg.get_sender_id())
        if kind == ABORT and not self._abort_is_real(sender, str(msg.get(ABORT_REASON))):
            return
        if self.client_rank == 0 and kind == C2S_CLIENT_STATUS:
            if msg.get(CLIENT_STATUS) == FINISHED:
                self._finished.add(sender)
            elif self._restarted(sender, msg.get(INCARNATION)):
                self.watch.heard(sender)
                self._welcome_back(sender)
                return
        super()._dispatch(msg)

    def _abort_is_real(self, sender: int, reason: str) -> bool:
        """Whether an abort notice ends this party now.

        With TLS the caller's certificate proved its rank. Without, anyone who reaches the port
        can claim a rank, so the notice counts only when the claimed sender's port closes soon
        after (a party that ends the job exits right after telling its peers): a background
        check decides, and the job goes on meanwhile. A client that leaves a job with a round
        deadline is a silent silo, not the job's end.
        """
        if self.deadline is not None and sender != 0:
            log.warning("%s left the job (%s); the federation goes on without it (progfed_round_deadline_s)",
                        self._describe(sender), reason[:300])
            return False
        if self.settings.tls is not None:
            return True
        with self._lock:
            if sender in self._checking:
                return False
            self._checking.add(sender)
        threading.Thread(target=self._confirm_abort, args=(sender, reason), daemon=True,
                         name=f"progfed-abort-check-{sender}").start()
        return False

    def _confirm_abort(self, sender: int, reason: str) -> None:
        end = time.monotonic() + ABORT_CHECK_S
        while time.monotonic() < end and self.is_running:
            if self._port_closed(sender, self.endpoints[sender]) is not None:
                if sender in self._finished:  # it ended normally after its last round: the notice was forged
                    break
                self.options.fatal(PeerError(f"{self._describe(sender)} ended the job: {reason}", peer=sender))
                return
            time.sleep(0.2)
        log.warning("ignored an abort notice claiming rank %d (%s): rank %d is still running, so the notice "
                    "was not its own", sender, reason[:200], sender)
        with self._lock:
            self._checking.discard(sender)

    def _restarted(self, rank: int, incarnation: Any) -> bool:
        """An ONLINE status from a new process of ``rank`` after the job started (a silo that restarted)."""
        known = self._incarnations.get(rank)
        self._incarnations[rank] = incarnation
        return self._started and known is not None and incarnation != known

    def last_model(self, rank: int) -> Any:
        """The last model message sent to ``rank`` (``None`` before the first)."""
        return self._last_model.get(rank)

    def _welcome_back(self, rank: int) -> None:
        """A silo that (re)registers mid-job gets the current model as its first, and takes part from then on."""
        last = self._last_model.get(rank)
        if last is None:
            return
        asked = self.guard.last_asked(rank)
        if asked is not None and asked.final:  # the run is over: let it finish
            log.warning("%s registered again after the last round; it is told to finish", self._describe(rank))
            done = Message(S2C_FINISH, 0, rank)
            done.add_params("client_idx", last.get("client_idx"))
            self.send_message(done)
            return
        log.warning("%s is back (it registered again); it is sent the current model", self._describe(rank))
        again = Message(S2C_INIT_CONFIG, 0, rank)
        for key, value in last.get_params().items():
            if key not in (Message.MSG_ARG_KEY_TYPE, Message.MSG_ARG_KEY_SENDER, Message.MSG_ARG_KEY_RECEIVER):
                again.add_params(key, value)
        self.send_message(again)

    # ---------------------------------------------------------------- sending

    def send_message(self, msg: Any) -> None:
        """Send one FedML message; raises :class:`PeerError` naming the receiver when it cannot be delivered."""
        self._stamp_device(msg)
        if self.client_rank != 0 and msg.get_type() == C2S_CLIENT_STATUS:
            msg.add_params(INCARNATION, _INCARNATION)
        receiver = int(msg.get_receiver_id())
        if receiver not in self.endpoints:
            raise PeerError(f"rank {receiver} is not in the ip-config {self.grpc_ipconfig_path}", peer=receiver)
        if self.client_rank == 0 and msg.get_type() in (S2C_INIT_CONFIG, S2C_SYNC_MODEL):
            self._record_model(receiver, msg)
        body = encode(msg.get_params(), self.settings.run_id)
        if self.deadline is not None:
            self.deadline.post(receiver, msg, body)  # delivered in the background: a stopped silo blocks nobody
        else:
            self.deliver_now(receiver, body, self._send_wait(receiver))
        self._after_send(msg)

    def _record_model(self, receiver: int, msg: Any) -> None:
        from fedml_progfed.comm.messages import HEADER_KEY, Header

        wire = msg.get(MODEL_PARAMS)
        round_ = None
        if isinstance(wire, Mapping) and HEADER_KEY in wire:
            round_ = Header.from_tensor(wire[HEADER_KEY], "an outgoing model").round
        silo = msg.get("client_idx")
        rounds_left = self.options.rounds_left(wire) if self.options.rounds_left is not None else None
        self.guard.asked(receiver, round_, None if silo is None else int(silo), final=rounds_left == 0)
        self._last_model[receiver] = msg
        self._started = True

    def deliver_now(self, receiver: int, body: bytes, wait: tuple[bool, float | None]) -> None:
        """Deliver one body and meter it; raises :class:`PeerError` naming the receiver on failure."""
        wait_for_ready, timeout = wait
        try:
            size = self.dialer.deliver(receiver, body, timeout, wait_for_ready)
        except grpc.RpcError as exc:
            # A peer that ended the job on purpose said why before it left: prefer its reason.
            raise self._queued_abort(receiver) or self._send_error(receiver, exc, wait_for_ready, timeout) from None
        if self.options.meter is not None:
            self.options.meter.sent(size)

    def _send_wait(self, receiver: int) -> tuple[bool, float | None]:
        """(wait for the peer to come up?, deadline): a client waits for a server it has not heard from yet."""
        if self.client_rank != 0 and receiver == 0 and not self.watch.has_heard(0):
            return True, self.options.startup_timeout_s
        return False, self.options.round_timeout_s

    def _queued_abort(self, sender: int) -> PeerError | None:
        """An abort notice from ``sender`` still waiting in the queue (this party was busy), as its error."""
        with self.inbox.queue.mutex:
            queued = [a for a in self.inbox.queue.queue if isinstance(a, Arrival) and len(a.body) < 65536]
        for arrival in queued:
            try:
                envelope = decode(arrival.body, self.settings.max_message_bytes)
            except RefusedMessage:
                continue
            if envelope.type == ABORT and envelope.sender == sender and self.guard.judge(envelope, arrival.identity) is None:
                return PeerError(f"{self._describe(sender)} ended the job: {envelope.params.get(ABORT_REASON)}", peer=sender)
        return None

    def _send_error(self, receiver: int, exc: grpc.RpcError, waited: bool, timeout: float | None) -> PeerError:
        code = exc.code() if hasattr(exc, "code") else None
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        who = self._describe(receiver)
        if waited and code == grpc.StatusCode.DEADLINE_EXCEEDED:
            problem = (f"{who} did not come up within {timeout:g} s (the start-up wait: progfed_args.progfed_round_timeout_s, "
                       f"at least 300 s); start it first")
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            problem = (f"{who} did not take a message within {timeout:g} s (progfed_args.progfed_round_timeout_s): "
                       f"it is stopped, overloaded or unreachable")
        elif code == grpc.StatusCode.UNAVAILABLE and self.settings.tls is not None and "handshake" in str(detail).lower():
            problem = (f"{who} refused this party's certificate or holds none of rank {receiver} ({detail}); give every "
                       f"party files from the same provisioning (comm_args.progfed_tls_*)")
        elif code == grpc.StatusCode.UNAVAILABLE:
            problem = f"{who} is gone or unreachable ({detail})"
        else:
            problem = f"sending to {who} failed: {getattr(code, 'name', code)} {detail}"
        return PeerError(problem, peer=receiver)

    # ---------------------------------------------------------------- liveness

    def _describe(self, rank: int) -> str:
        endpoint = self.endpoints.get(rank)
        where = f" at {endpoint.address}" if endpoint else ""
        return f"the server (rank 0{where})" if rank == 0 else f"client rank {rank}{where}"

    def _liveness_probe(self) -> Any:
        # with a round deadline a gone silo is a silent one, not the job's end
        return None if self.deadline is not None else self._probe

    def _probe(self, rank: int) -> PeerError | None:
        """A peer whose port refuses connections is gone (a stopped one still accepts: its deadline catches it)."""
        endpoint = self.endpoints.get(rank)
        if endpoint is None or rank in self._checking:  # its abort notice, being confirmed, says more
            return None
        return self._port_closed(rank, endpoint)

    def _port_closed(self, rank: int, endpoint: Endpoint) -> PeerError | None:
        try:
            with socket.create_connection((endpoint.ingress or endpoint.host, endpoint.port), timeout=1.0):
                return None
        except ConnectionRefusedError:
            return PeerError(f"{self._describe(rank)} is gone: its port refuses connections (the process ended)", peer=rank)
        except OSError:
            return None  # unreachable for now (timeout, no route): the deadline decides
