"""FedML's cross-silo runtime around our pair: arguments, offline init, the run, the results folder.

``python -m fedml_progfed.main`` calls :func:`run_cross_silo` when
``training_type: cross_silo``: under ``mpirun`` (``backend: MPI``), or started per
party by FedML's agents or by hand (``--rank R --role server|client``, ``backend:
GRPC`` or ``MQTT_S3``). FedML's runtime calls every hook of the pair; rank 0 writes
the same results folder as a standalone run.

A job never hangs: every exception, in any thread of any party, becomes one
``error: rank R (role): ...`` line and the end of the whole job (:class:`JobEnd`):
under MPI through ``MPI.COMM_WORLD.Abort``; under gRPC the failing party tells its
peers why (an abort notice) and exits, and a peer that is gone or silent longer
than ``progfed_round_timeout_s`` is named by the others' watchdogs
(:mod:`fedml_progfed.fedml_plugin.comm`).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

log = logging.getLogger("fedml_progfed")

# Command-line keys FedML's own parser knows (fedml/arguments.py: add_args).
FEDML_CLI_DEFAULTS = {"run_id": "0", "rank": 0, "local_rank": 0, "node_rank": 0, "role": "client", "run_device_id": "0"}


def fedml_arguments(sections: dict, ns: argparse.Namespace):
    """FedML's ``Arguments`` object, filled as ``fedml.load_arguments`` would, from our resolved sections."""
    from fedml.arguments import Arguments

    from fedml_progfed.config import flatten

    args = object.__new__(Arguments)
    for key in FEDML_CLI_DEFAULTS:
        setattr(args, key, getattr(ns, key))
    args.yaml_config_file = ns.cf
    for key, value in flatten(sections).items():
        setattr(args, key, value)
    if not hasattr(args, "worker_num"):
        args.worker_num = args.client_num_per_round
    # FedML calls the aggregator's test every round; the server decides which rounds it tests
    # (frequency_of_the_test stays in our config), so resumed runs test the same rounds.
    args.frequency_of_the_test = 1
    if getattr(args, "data_cache_dir", None):
        args.data_cache_dir = os.path.expanduser(args.data_cache_dir)
    return args


def _quiet_fedml_logs(rank: int) -> None:
    """FedML logs every message at INFO; keep warnings, and our own lines on rank 0."""
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[fedml_progfed] %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def _truthy(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def check_cross_silo(config) -> None:
    """Rules that only cross-silo runs have, checked before any process starts training."""
    from fedml_progfed.comm.codecs import parse_spec
    from fedml_progfed.errors import FieldError

    partial = config.client_num_per_round < config.client_num_in_total
    if partial and config.profl.memory_budgets:
        raise FieldError(
            "client_num_per_round",
            f"{config.client_num_per_round} of {config.client_num_in_total}: with profl_memory_budgets the server "
            f"chooses among the clients that fit a round, but FedML's cross-silo runtime calls its own sample; set "
            f"client_num_per_round equal to client_num_in_total (clients that do not fit answer with a skip)",
        )
    if partial and parse_spec(config.progfed.compression_up).error_feedback:
        raise FieldError(
            "progfed.compression_up",
            f"{config.progfed.compression_up!r}: '+ef' keeps each silo's residual in the process that trained it, "
            f"and with partial participation FedML's cross-silo runtime moves silos between processes, so the "
            f"residual would not follow its silo; set train_args.client_num_per_round equal to client_num_in_total "
            f"(every silo in its own process every round) or drop '+ef'",
        )


class JobEnd:
    """Turns the first exception of a cross-silo process into one error line and the end of the job.

    Parameters
    ----------
    backend
        ``MPI`` ends every rank with ``MPI.COMM_WORLD.Abort``; gRPC tells the peers why
        (:attr:`notify`, abort notices) and leaves with ``os._exit``, since FedML's
        non-daemon threads would keep a returning process alive.
    rank, role
        Named in the error line.
    """

    def __init__(self, backend: str, rank: int, role: str) -> None:
        self.backend, self.rank, self.role = backend, rank, role
        if backend == "MPI":  # before FedML's init every rank's --rank is 0; mpirun says which it is
            self.rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", rank)))
            self.role = "server" if self.rank == 0 else "client"
        self.notify: Any = None  # (reason, skip) -> None: abort notices to the peers (gRPC)
        self._lock = threading.Lock()
        self._ending = False

    @property
    def who(self) -> str:
        return f"rank {self.rank} ({self.role})"

    def install(self) -> None:
        """Exceptions in FedML's or gRPC's threads end the job too (FedML's MPI receive thread raises there);
        so do SIGINT and SIGTERM, which a launcher's background processes may otherwise ignore or die of silently."""
        threading.excepthook = lambda hook: self.fatal(hook.exc_value) if hook.exc_type is not SystemExit else None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, _terminated)

    def done(self) -> None:
        """The run succeeded: a thread failing while the process winds down is no longer the job's end."""
        threading.excepthook = threading.__excepthook__

    def fatal(self, exc: BaseException) -> None:
        """Print the error once, stop the job, exit this process; never returns."""
        with self._lock:
            first, self._ending = not self._ending, True
        if not first:
            threading.Event().wait()  # another thread is already ending the process
        code = 1
        try:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the notices short
            message, code = describe_failure(exc)
            print(f"error: {self.who}: {message}", file=sys.stderr, flush=True)
            if self.backend == "MPI":
                from mpi4py import MPI

                MPI.COMM_WORLD.Abort(code)
            if self.notify is not None:
                self.notify(f"{self.who}: {message}", getattr(exc, "peer", None))
        finally:  # whatever failed above, this process ends
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so the job ends like on Ctrl-C."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """The error line's text and the exit status: 2 for errors a user can fix, 130 for Ctrl-C, 1 for bugs."""
    from fedml_progfed.config import explain
    from fedml_progfed.errors import ProgFedError

    if isinstance(exc, ProgFedError):
        return explain(exc), 2
    if isinstance(exc, Terminated):
        return "terminated (SIGTERM)", 143
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C or SIGINT)", 130
    traceback.print_exception(exc, file=sys.stderr)  # a bug: keep the traceback above the one line
    return f"{type(exc).__name__}: {exc}", 1


def resolve_config_path(value: str, config_file: str | os.PathLike | None) -> Path:
    """A path from the config: as given if it exists (relative to the working folder), else next to the config file.

    FedML's examples name files relative to the folder they run in; a packaged job runs
    elsewhere, so a relative path is also looked up beside the YAML.
    """
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or config_file is None:
        return path
    beside = Path(config_file).resolve().parent / path
    return beside if beside.exists() else path


def grpc_endpoints(config, rank: int, role: str, config_file: str | None) -> dict:
    """The checked ip-config of a gRPC job; errors name the key or the command-line flag."""
    from fedml_progfed.errors import ConfigError, FieldError
    from fedml_progfed.fedml_plugin.grpc_comm import read_ip_config

    if not config.grpc_ipconfig_path:
        raise FieldError(
            "grpc_ipconfig_path",
            "backend GRPC needs the ip-config every party shares (CSV: eid,rank,grpc_server_ip,grpc_server_port); "
            "run_scripts/run_grpc_cross_silo.sh writes one for a single machine",
        )
    parties = config.client_num_per_round + 1
    endpoints = read_ip_config(resolve_config_path(config.grpc_ipconfig_path, config_file), parties)
    if not 0 <= rank < parties:
        raise ConfigError(f"--rank {rank}: a gRPC job of {parties} parties has ranks 0 (server) to {parties - 1}")
    if (rank == 0) != (role == "server"):
        raise ConfigError(f"--rank {rank} --role {role}: rank 0 is the server and every other rank a client")
    return endpoints


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def processes_on_this_host(endpoints: dict, rank: int) -> int:
    """Parties of a gRPC job that share this machine (same listen address, or all on loopback)."""
    own = endpoints[rank].host
    return sum(1 for e in endpoints.values() if e.host == own or (_is_loopback(e.host) and _is_loopback(own)))


def describe_transport(config, rank: int, config_file: str | None) -> str:
    """One line for a dry run: which backend this party would use, and its endpoints."""
    backend = config.backend
    if backend == "GRPC":
        role = "server" if rank == 0 else "client"
        endpoints = grpc_endpoints(config, rank, role, config_file)
        own = endpoints[rank]
        peers = ", ".join(f"{r}={e.address}" for r, e in sorted(endpoints.items()) if r != rank)
        return (f"transport GRPC: rank {rank} listens on {own.host}:{own.port}, peers {peers} "
                f"(ip-config {resolve_config_path(config.grpc_ipconfig_path, config_file)}; insecure channels)")
    if backend == "MQTT_S3":
        return ("transport MQTT_S3: MQTT broker and S3 bucket from FedML's platform (the Octopus agents supply them; "
                "or customized_training_mqtt_config / customized_training_s3_config)")
    if backend == "MPI":
        return f"transport MPI: {config.client_num_per_round + 1} processes under mpirun"
    return f"transport {backend}"


def wire_summary(rows: list[dict]) -> dict[str, Any] | None:
    """Wire bytes against payload bytes over the rounds that measured them; ``None`` when none did."""
    measured = [r for r in rows if r.get("wire_bytes_down") not in (None, "")]
    if not measured:
        return None
    totals = {
        key: int(sum(r[key] for r in measured))
        for key in ("wire_bytes_down", "wire_bytes_up", "bytes_down", "bytes_up")
    }
    ratio = lambda wire, payload: wire / payload if payload else None  # noqa: E731
    return {
        **totals,
        "overhead_ratio_down": ratio(totals["wire_bytes_down"], totals["bytes_down"]),
        "overhead_ratio_up": ratio(totals["wire_bytes_up"], totals["bytes_up"]),
        "overhead_ratio": ratio(totals["wire_bytes_down"] + totals["wire_bytes_up"], totals["bytes_down"] + totals["bytes_up"]),
        "counted": "gRPC messages (protobuf request with FedML's pickled Message + 5-byte gRPC prefix), control "
                   "messages included; HTTP/2 frame headers and TCP/IP not counted",
    }


def rounds_after(wire: Any, total_rounds: int) -> int | None:
    """The rounds a client runs when the server's first model is of round ``header.round``."""
    from collections.abc import Mapping

    from fedml_progfed.comm.messages import HEADER_KEY, Header

    if not isinstance(wire, Mapping) or HEADER_KEY not in wire:
        return None  # not our message: the trainer names the problem
    return max(0, total_rounds - Header.from_tensor(wire[HEADER_KEY], "the server's first model").round)


def run_cross_silo(sections: dict, config, ns: argparse.Namespace, out: Path, started_at: float) -> int:
    """Run this party of a cross-silo job; rank 0 writes the results folder. Failures end the job (:class:`JobEnd`)."""
    job = JobEnd(config.backend, int(ns.rank), ns.role)
    job.install()
    try:
        return _run(sections, config, ns, out, started_at, job)
    except BaseException as exc:  # noqa: BLE001 - every failure must end every party, not only this one
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        job.fatal(exc)
        raise  # unreachable: fatal exits


def _run(sections: dict, config, ns: argparse.Namespace, out: Path, started_at: float, job: JobEnd) -> int:
    import torch
    from fedml import FedMLRunner

    from fedml_progfed.fedml_plugin.comm import CommOptions, WireMeter
    from fedml_progfed.fedml_plugin.install import comm_managers_installed
    from fedml_progfed.fedml_plugin.offline import init_fedml_offline
    from fedml_progfed.runners.experiment import write_results
    from fedml_progfed.runners.checkpoint import latest_checkpoint, read_checkpoint
    from fedml_progfed.runners.federation import build_federation
    from fedml_progfed.runners.recorder import RunRecorder
    from fedml_progfed.runners.run_dir import check_same_config, prepare_out, write_config

    check_cross_silo(config)
    transport: dict[str, Any] = {}
    if config.backend == "GRPC":
        endpoints = grpc_endpoints(config, int(ns.rank), ns.role, ns.cf)
        transport["endpoints"] = endpoints
        from fedml_progfed.fedml_plugin.grpc_comm import send_abort_notices

        job.notify = lambda reason, skip: send_abort_notices(endpoints, int(ns.rank), reason, skip)
    args = fedml_arguments(sections, ns)
    if config.backend == "GRPC":
        args.grpc_ipconfig_path = str(resolve_config_path(config.grpc_ipconfig_path, ns.cf))
    if _truthy(ns.using_mlops):
        import fedml

        args.using_mlops = True  # deployed by FedML's agents: the platform is the user's choice
        args = fedml.init(args, check_env=False)
    else:
        args = init_fedml_offline(args)
    job.rank, job.role = int(args.rank), args.role  # under mpirun FedML assigns both
    _quiet_fedml_logs(int(args.rank))
    # Processes sharing this machine's cores: one torch thread each avoids oversubscription.
    # Under gRPC args.comm is None: count the ip-config's parties on this host instead.
    world = getattr(getattr(args, "comm", None), "Get_size", lambda: 1)()
    local = processes_on_this_host(transport["endpoints"], int(args.rank)) if "endpoints" in transport else world
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    server = args.role == "server"
    resume = getattr(ns, "resume", None)
    if server:
        prepare_out(out, overwrite=getattr(ns, "overwrite", False), resume=resume is not None)
        if resume is not None:
            check_same_config(out, sections)
    # Only the server reads the checkpoint (clients may be on other machines); a client learns
    # where the run stands from the round of the server's first model (CommOptions.rounds_left).
    checkpoint = latest_checkpoint(Path(resume)) if server and resume is not None else None
    rounds_done = int(read_checkpoint(checkpoint)[1]["round"]) if checkpoint is not None else 0
    fed = build_federation(config, sections, args=args)
    meter = WireMeter() if server and config.backend == "GRPC" else None
    if server:
        recorder = RunRecorder(out, config)
        if checkpoint is not None:
            recorder.restore(fed.server, checkpoint)
            log.info("resuming from %s: %d of %d rounds done", checkpoint, rounds_done, fed.total_rounds)
        else:
            write_config(out, sections)
        fed.server.round_hooks.append(recorder)
        fed.server.wire_meter = meter
    # extra warm-up rounds make the run longer than T; a resumed run is shorter
    args.comm_round = fed.total_rounds - rounds_done
    options = CommOptions(config.round_timeout_s, job.fatal, device=str(fed.device), meter=meter,
                          rounds_left=lambda wire: rounds_after(wire, fed.total_rounds))
    model = fed.server.model if server else fed.trainer.model
    with comm_managers_installed(config.backend, options, **transport):
        FedMLRunner(args, fed.device, fed.data.as_list(), model, fed.trainer, fed.aggregator).run()
    job.done()
    if server:
        # start-up: from this process's start to the first broadcast (every rank imported, loaded data, connected)
        first = fed.server.first_broadcast_at
        startup_s = first - started_at if first else None
        devices = options.created[0].devices if options.created else {0: str(fed.device)}
        parties = config.client_num_per_round + 1
        extra = {
            "startup_s": startup_s, "world_size": parties, "backend": config.backend,
            "devices": {str(rank): device for rank, device in sorted(devices.items())},
        }
        wire = wire_summary(fed.server.state.ledger.rows)
        if wire is not None:
            extra["wire"] = wire
        summary = write_results(out, sections, fed, config.progfed.strategy, runtime="cross_silo", extra=extra)
        log.info(
            "done: final %s %.4f, two-way %.2f MB, start-up of %d processes %.1f s -> %s",
            summary["metric_name"], summary["final_metric"] or float("nan"), summary["total_bytes"] / 1e6,
            parties, startup_s or float("nan"), out,
        )
    return 0
