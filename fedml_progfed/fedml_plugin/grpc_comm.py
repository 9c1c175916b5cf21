"""FedML's gRPC comm manager without its busy loop, with deadlines on every send and exact wire bytes.

FedML 0.9.6's ``GRPCCommManager`` (``core/distributed/communication/grpc/``) polls
its queue in a loop whose ``sleep`` sits after the loop, so every waiting party
spins a core; its sends have no deadline (a stopped peer blocks the sender
forever) and a client started before its server dies with ``UNAVAILABLE``.
:class:`ProgFedGRPCCommManager` keeps FedML's server, servicer, queue and
ip-config, and replaces the loop and the send:

- the loop blocks on the servicer's queue (:class:`~fedml_progfed.fedml_plugin.comm.WatchedComm`);
- a send has a deadline (the round timeout) and failures name the peer;
- a client waits for a server that is not up yet (bounded) instead of dying;
- every request is measured: protobuf ``CommRequest`` (FedML's pickled ``Message``
  plus rank) and gRPC's 5-byte message prefix, which is what the gRPC layer hands
  to HTTP/2. HTTP/2 frame headers (9 bytes per 16 KiB frame), the per-call
  header block and TCP/IP are below what Python can see and are not counted.
"""

from __future__ import annotations

import csv
import logging
import pickle
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import grpc
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2, grpc_comm_manager_pb2_grpc
from fedml.core.distributed.communication.grpc.grpc_comm_manager import GRPCCommManager

from fedml_progfed.errors import ConfigError, PeerError
from fedml_progfed.fedml_plugin.comm import ABORT, ABORT_REASON, CommOptions, WatchedComm

log = logging.getLogger("fedml_progfed")

#: gRPC's length-prefixed message: 1 flag byte + 4 length bytes in front of every message.
GRPC_MESSAGE_PREFIX = 5


@dataclass(frozen=True)
class Endpoint:
    """One row of FedML's ip-config: where ``rank`` listens (``host``) and where peers reach it (``ingress``)."""

    rank: int
    host: str
    port: int
    ingress: str | None = None

    @property
    def address(self) -> str:
        """``host:port`` peers connect to (the ingress address when one is given)."""
        return f"{self.ingress or self.host}:{self.port}"


def read_ip_config(path: str | Path, ranks: int) -> dict[int, Endpoint]:
    """Read and check FedML's ip-config CSV (``eid,rank,grpc_server_ip,grpc_server_port[,ingress_ip]``).

    Every rank ``0..ranks-1`` must have a row: FedML binds a missing rank to ``0.0.0.0``.

    Raises
    ------
    ConfigError
        Missing file, missing columns or ranks, bad port; the message names ``comm_args.grpc_ipconfig_path``.
    """
    key = "comm_args.grpc_ipconfig_path"
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: {str(path)!r} does not exist; it lists eid,rank,grpc_server_ip,grpc_server_port "
                          f"for the server (rank 0) and every client")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    needed = {"eid", "rank", "grpc_server_ip", "grpc_server_port"}
    if not rows or not needed <= set(rows[0]):
        raise ConfigError(f"{key}: {path} must have the columns {', '.join(sorted(needed))} (and optionally ingress_ip)")
    endpoints: dict[int, Endpoint] = {}
    for line, row in enumerate(rows, start=2):
        try:
            eid, port = int(row["eid"]), int(row["grpc_server_port"])
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {path} line {line}: eid and grpc_server_port must be integers") from None
        if not 0 < port < 65536:
            raise ConfigError(f"{key}: {path} line {line}: port {port} is not in 1..65535")
        endpoints[eid] = Endpoint(eid, str(row["grpc_server_ip"]).strip(), port, (row.get("ingress_ip") or "").strip() or None)
    missing = [r for r in range(ranks) if r not in endpoints]
    if missing:
        raise ConfigError(
            f"{key}: {path} has no row for rank {', '.join(map(str, missing))}; list the server (0) and every client "
            f"(1..{ranks - 1}) (FedML would bind a missing rank to 0.0.0.0)"
        )
    return endpoints


def request_size(client_id: int, payload: int) -> int:
    """Serialized size of FedML's ``CommRequest{int32 client_id = 1; bytes message = 2}`` holding ``payload`` bytes."""
    size = 1 + _varint_size(payload) + payload if payload else 0  # proto3 leaves out empty and zero fields
    if client_id:
        size += 1 + (10 if client_id < 0 else _varint_size(client_id))
    return size


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def deliver(
    endpoint: Endpoint, sender: int, payload: bytes, timeout: float | None, wait_for_ready: bool = False,
    options: list | None = None,
) -> int:
    """One ``sendMessage`` call as FedML's servicer expects it; returns the bytes handed to gRPC."""
    request = grpc_comm_manager_pb2.CommRequest(client_id=sender, message=payload)
    options = list(options or [])
    if wait_for_ready:  # retry a peer that is not up yet every second, not on gRPC's back-off of up to 2 minutes
        options += [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 1000)]
    with grpc.insecure_channel(endpoint.address, options=options) as channel:
        grpc_comm_manager_pb2_grpc.gRPCCommManagerStub(channel).sendMessage(
            request, timeout=timeout, wait_for_ready=wait_for_ready
        )
    return request.ByteSize() + GRPC_MESSAGE_PREFIX


def send_abort_notices(
    endpoints: Mapping[int, Endpoint], rank: int, reason: str, skip: int | None = None, timeout_s: float = 3.0
) -> None:
    """Tell the peers of ``rank`` (the server: every client; a client: its server) that the job ends, and why.

    Best effort and bounded: peers that are gone or stopped are the reason, not an obstacle.
    """
    from fedml.core.distributed.communication.message import Message

    peers = [r for r in endpoints if r != rank] if rank == 0 else [0]

    def notify(peer: int) -> None:
        msg = Message(ABORT, rank, peer)
        msg.add_params(ABORT_REASON, reason)
        try:
            deliver(endpoints[peer], rank, pickle.dumps(msg), timeout_s)
        except Exception:  # noqa: BLE001 - a peer that cannot hear it ends by its own watchdog
            pass

    threads = [threading.Thread(target=notify, args=(p,), daemon=True) for p in peers if p != skip and p in endpoints]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + 1)


class ProgFedGRPCCommManager(WatchedComm, GRPCCommManager):
    """FedML's gRPC comm manager with a blocking loop, bounded sends, wire metering (see the module docstring).

    Parameters
    ----------
    grpc_ipconfig_path, topic, client_rank, client_num, args
        As FedML's ``GRPCCommManager``.
    options
        Deadlines, the ``fatal`` callback, device and meter (:class:`~fedml_progfed.fedml_plugin.comm.CommOptions`).
    endpoints
        The checked ip-config (:func:`read_ip_config`).
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
        endpoints: Mapping[int, Endpoint],
    ) -> None:
        self.endpoints = dict(endpoints)
        self._setup_watch(int(client_rank), int(client_num), options)
        super().__init__(grpc_ipconfig_path, topic=topic, client_rank=client_rank, client_num=client_num, args=args)

    # ---------------------------------------------------------------- receiving

    def message_handling_subroutine(self) -> None:
        """FedML's loop, blocking instead of spinning (same order: unpickle, then every observer)."""
        self._receive_loop()

    def _running(self) -> bool:
        return self.is_running

    def _next_message(self, timeout: float) -> Any:
        payload = self.grpc_servicer.message_q.get(timeout=timeout)
        msg = pickle.loads(payload)  # FedML's wire format; trust model in the README
        if self.options.meter is not None:
            self.options.meter.received(request_size(int(msg.get_sender_id()), len(payload)) + GRPC_MESSAGE_PREFIX)
        return msg

    # ---------------------------------------------------------------- sending

    def send_message(self, msg: Any) -> None:
        """Send one FedML message; raises :class:`PeerError` naming the receiver when it cannot be delivered."""
        self._stamp_device(msg)
        receiver = int(msg.get_receiver_id())
        own = self.endpoints[self.client_rank]
        # The sender fields FedML's own receiver reads for peers missing from its ip-config.
        msg.add_params(self.MSG_ARG_KEY_SENDER_RANK, self.client_rank)
        msg.add_params(self.MSG_ARG_KEY_SENDER_IP, own.ingress or own.host)
        msg.add_params(self.MSG_ARG_KEY_SENDER_PORT, own.port)
        size = self._deliver(receiver, pickle.dumps(msg), self._send_wait(receiver))
        if self.options.meter is not None:
            self.options.meter.sent(size)
        self._after_send(msg)

    def _send_wait(self, receiver: int) -> tuple[bool, float | None]:
        """(wait for the peer to come up?, deadline): a client waits for a server it has not heard from yet."""
        if self.client_rank != 0 and receiver == 0 and not self.watch.has_heard(0):
            return True, self.options.startup_timeout_s
        return False, self.options.round_timeout_s

    def _deliver(self, receiver: int, payload: bytes, wait: tuple[bool, float | None]) -> int:
        wait_for_ready, timeout = wait
        endpoint = self.endpoints.get(receiver)
        if endpoint is None:
            raise PeerError(f"rank {receiver} is not in the ip-config {self.grpc_ipconfig_path}", peer=receiver)
        try:
            return deliver(endpoint, self.client_id, payload, timeout, wait_for_ready, self.opts)
        except grpc.RpcError as exc:
            # A peer that ended the job on purpose said why before it left: prefer its reason.
            raise self._queued_abort(receiver) or self._send_error(receiver, exc, wait_for_ready, timeout) from None

    def _queued_abort(self, sender: int) -> PeerError | None:
        """An abort notice from ``sender`` still waiting in the queue (this party was busy), as its error."""
        with self.grpc_servicer.message_q.mutex:
            queued = [p for p in self.grpc_servicer.message_q.queue if len(p) < 65536]  # notices are small
        for payload in queued:
            msg = pickle.loads(payload)
            if msg.get_type() == ABORT and int(msg.get_sender_id()) == sender:
                return PeerError(f"{self._describe(sender)} ended the job: {msg.get(ABORT_REASON)}", peer=sender)
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

    def _probe(self, rank: int) -> PeerError | None:
        """A peer whose port refuses connections is gone (a stopped one still accepts: its deadline catches it)."""
        endpoint = self.endpoints.get(rank)
        if endpoint is None:
            return None
        try:
            with socket.create_connection((endpoint.ingress or endpoint.host, endpoint.port), timeout=1.0):
                return None
        except ConnectionRefusedError:
            return PeerError(f"{self._describe(rank)} is gone: its port refuses connections (the process ended)", peer=rank)
        except OSError:
            return None  # unreachable for now (timeout, no route): the deadline decides
