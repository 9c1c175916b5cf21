"""Where a gRPC job's parties are and how one party reaches another: ip-config, settings, dialing, abort notices.

Shared by our gRPC comm manager (:mod:`~fedml_progfed.fedml_plugin.grpc_comm`), the
cross-silo runner (its abort notices and start-up checks) and provisioning.
"""

from __future__ import annotations

import csv
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import grpc
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2, grpc_comm_manager_pb2_grpc

from fedml_progfed.comm.envelope import encode
from fedml_progfed.errors import ConfigError
from fedml_progfed.fedml_plugin.comm import ABORT, ABORT_REASON
from fedml_progfed.fedml_plugin.grpc_tls import TLSMaterial, rank_name

#: gRPC's length-prefixed message: 1 flag byte + 4 length bytes in front of every message.
GRPC_MESSAGE_PREFIX = 5


class BindError(ConfigError):
    """This party cannot listen on its address. Peers are not told: the job may be another process's."""

    tell_peers = False


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


def check_port_free(endpoint: Endpoint) -> None:
    """Fail now, with the rank and the address, when another process already listens on this party's port.

    Raises
    ------
    BindError
        The address is in use (a second process for a running rank) or not one of this machine's.
    """
    family = socket.AF_INET6 if ":" in endpoint.host.strip("[]") else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT left by an earlier run
        probe.bind((endpoint.host.strip("[]"), endpoint.port))
    except OSError as exc:
        raise bind_error(endpoint, exc.strerror or str(exc)) from None
    finally:
        probe.close()


def bind_error(endpoint: Endpoint, why: str) -> BindError:
    return BindError(
        f"rank {endpoint.rank} cannot listen on {endpoint.host}:{endpoint.port} ({why}): another process for "
        f"--rank {endpoint.rank} is running, or the ip-config (comm_args.grpc_ipconfig_path) names an address "
        f"that is not this machine's; stop the other process or fix the ip-config"
    )


@dataclass(frozen=True)
class GRPCSettings:
    """What a gRPC party needs besides FedML's arguments.

    Attributes
    ----------
    endpoints
        The checked ip-config (:func:`read_ip_config`).
    run_id
        The job's run id; messages of any other run are dropped.
    max_message_bytes
        Largest body accepted (:func:`~fedml_progfed.comm.envelope.message_limit`).
    tls
        This party's certificate files; ``None``: plain TCP (loopback, or an explicit insecure key).
    deadline_s
        ``progfed_round_deadline_s``: the server's wait for a round's updates before the silent are left out.
    min_clients
        Updates a round needs before the deadline may close it.
    """

    endpoints: Mapping[int, Endpoint]
    run_id: str
    max_message_bytes: int
    tls: TLSMaterial | None = None
    deadline_s: float | None = None
    min_clients: int = 1


class Dialer:
    """Sends request bodies to the job's parties, over TLS when the settings hold certificates."""

    def __init__(self, rank: int, settings: GRPCSettings) -> None:
        self.rank, self.settings = rank, settings
        limit = settings.max_message_bytes
        self.options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
                        ("grpc.enable_http_proxy", 0)]
        self._credentials = settings.tls.channel_credentials() if settings.tls else None

    def deliver(self, receiver: int, body: bytes, timeout: float | None, wait_for_ready: bool = False) -> int:
        """One ``sendMessage`` call; returns the bytes handed to gRPC. Raises ``grpc.RpcError`` or ``KeyError``."""
        endpoint = self.settings.endpoints[receiver]
        request = grpc_comm_manager_pb2.CommRequest(client_id=self.rank, message=body)
        options = list(self.options)
        if wait_for_ready:  # retry a peer that is not up yet every second, not on gRPC's back-off of up to 2 minutes
            options += [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                        ("grpc.max_reconnect_backoff_ms", 1000)]
        if self._credentials is None:
            channel = grpc.insecure_channel(endpoint.address, options=options)
        else:
            # the party listening there must hold the certificate of the rank we mean to reach
            options.append(("grpc.ssl_target_name_override", rank_name(receiver)))
            channel = grpc.secure_channel(endpoint.address, self._credentials, options=options)
        with channel:
            grpc_comm_manager_pb2_grpc.gRPCCommManagerStub(channel).sendMessage(
                request, timeout=timeout, wait_for_ready=wait_for_ready
            )
        return request.ByteSize() + GRPC_MESSAGE_PREFIX


def abort_body(rank: int, receiver: int, reason: str, run_id: str) -> bytes:
    """The body of an abort notice (same wire format as every other message)."""
    return encode({"msg_type": ABORT, "sender": rank, "receiver": receiver, ABORT_REASON: reason}, run_id)


def send_abort_notices(dialer: Dialer, reason: str, skip: int | None = None, timeout_s: float = 3.0) -> None:
    """Tell the peers of this party (the server: every client; a client: its server) that the job ends, and why.

    Best effort and bounded: peers that are gone or stopped are the reason, not an obstacle.
    """
    rank, endpoints = dialer.rank, dialer.settings.endpoints
    peers = [r for r in endpoints if r != rank] if rank == 0 else [0]

    def notify(peer: int) -> None:
        try:
            dialer.deliver(peer, abort_body(rank, peer, reason, dialer.settings.run_id), timeout_s)
        except Exception:  # noqa: BLE001 - a peer that cannot hear it ends by its own watchdog
            pass

    threads = [threading.Thread(target=notify, args=(p,), daemon=True) for p in peers if p != skip and p in endpoints]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + 1)
