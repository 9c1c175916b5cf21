"""The run of one cross-silo party: FedML's init, our federation and recorder, FedML's runner, rank 0's results."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fedml_progfed.runners.cross_silo.arguments import fedml_arguments
from fedml_progfed.runners.cross_silo.endpoints import grpc_endpoints, processes_on_this_host, resolve_config_path
from fedml_progfed.runners.cross_silo.lifecycle import JobEnd
from fedml_progfed.runners.cross_silo.rounds import rounds_after
from fedml_progfed.runners.cross_silo.rules import check_cross_silo
from fedml_progfed.runners.cross_silo.security import transport_security
from fedml_progfed.runners.cross_silo.wire import wire_summary

log = logging.getLogger("fedml_progfed")


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
    """Set this party up (transport, FedML, threads, results folder, checkpoint), then hand it to FedML's runner."""
    import torch
    from fedml import FedMLRunner

    from fedml_progfed.fedml_plugin.comm import CommOptions, WireMeter
    from fedml_progfed.fedml_plugin.install import comm_managers_installed, silo_sampling_installed
    from fedml_progfed.runners.checkpoint import latest_checkpoint, read_checkpoint
    from fedml_progfed.runners.federation import build_federation
    from fedml_progfed.runners.recorder import RunRecorder
    from fedml_progfed.config import redacted
    from fedml_progfed.runners.run_dir import check_same_config, prepare_out, write_config

    check_cross_silo(config)
    endpoints = grpc_endpoints(config, int(ns.rank), ns.role, ns.cf) if config.backend == "GRPC" else None
    mqtt_s3 = _mqtt_s3_settings(sections, config, ns, job) if config.backend == "MQTT_S3" else None
    if endpoints is not None:
        from fedml_progfed.fedml_plugin.grpc_dial import check_port_free

        check_port_free(endpoints[int(ns.rank)])  # a second process for a running rank stops here, alone
        tls = transport_security(config, int(ns.rank), endpoints, ns.cf)
        _tell_peers_on_failure(job, _grpc_settings(config, ns, endpoints, tls))
    args = _init_fedml(sections, config, ns)
    job.rank, job.role = int(args.rank), args.role  # under mpirun FedML assigns both
    _quiet_fedml_logs(int(args.rank))
    # Processes sharing this machine's cores: one torch thread each avoids oversubscription.
    # Under gRPC args.comm is None: count the ip-config's parties on this host instead.
    world = getattr(getattr(args, "comm", None), "Get_size", lambda: 1)()
    local = processes_on_this_host(endpoints, int(args.rank)) if endpoints is not None else world
    if mqtt_s3 is not None:  # no world size either: a loopback broker means the whole job is on this host
        local = config.client_num_per_round + 1 if mqtt_s3.broker_is_loopback else 1
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    server = args.role == "server"
    resume = getattr(ns, "resume", None)
    if server:
        prepare_out(out, overwrite=getattr(ns, "overwrite", False), resume=resume is not None)
        if resume is not None:
            check_same_config(out, redacted(sections))
    # Only the server reads the checkpoint (clients may be on other machines); a client learns
    # where the run stands from the round of the server's first model (CommOptions.rounds_left).
    checkpoint = latest_checkpoint(Path(resume)) if server and resume is not None else None
    rounds_done = int(read_checkpoint(checkpoint)[1]["round"]) if checkpoint is not None else 0
    fed = build_federation(config, sections, args=args)
    meter = WireMeter() if server and config.backend in ("GRPC", "MQTT_S3") else None
    if server:
        recorder = RunRecorder(out, config)
        if checkpoint is not None:
            recorder.restore(fed.server, checkpoint)
            log.info("resuming from %s: %d of %d rounds done", checkpoint, rounds_done, fed.total_rounds)
        else:
            write_config(out, redacted(sections))  # credentials stay out of the run folder
        recorder.start(fed.server)
        fed.server.round_hooks.append(recorder)
        fed.server.wire_meter = meter
    # extra warm-up rounds make the run longer than T; a resumed run is shorter
    args.comm_round = fed.total_rounds - rounds_done
    options = CommOptions(config.round_timeout_s, job.fatal, device=str(fed.device), meter=meter,
                          rounds_left=lambda wire: rounds_after(wire, fed.total_rounds))
    model = fed.server.model if server else fed.trainer.model
    transport: dict[str, Any] = {}
    if endpoints is not None:
        from fedml_progfed.comm.envelope import message_limit

        transport["settings"] = _grpc_settings(config, ns, endpoints, tls, message_limit(model.state_dict()))
    if mqtt_s3 is not None:
        import dataclasses

        from fedml_progfed.comm.envelope import message_limit

        transport["settings"] = dataclasses.replace(mqtt_s3, max_message_bytes=message_limit(model.state_dict()))
    with comm_managers_installed(config.backend, options, **transport), silo_sampling_installed():
        FedMLRunner(args, fed.device, fed.data.as_list(), model, fed.trainer, fed.aggregator).run()
    job.done()
    if server:
        _write_server_results(out, sections, config, fed, options, started_at)
    return 0


def _grpc_settings(config, ns: argparse.Namespace, endpoints: dict, tls: Any, max_message_bytes: int = 64 << 20) -> Any:
    """Our gRPC transport's settings (the message bound is the model's once it is built)."""
    from fedml_progfed.fedml_plugin.grpc_dial import GRPCSettings

    return GRPCSettings(
        endpoints=endpoints, run_id=str(ns.run_id), max_message_bytes=max_message_bytes, tls=tls,
        deadline_s=config.progfed.round_deadline_s, min_clients=config.progfed.min_clients,
    )


def _mqtt_s3_settings(sections: dict, config, ns: argparse.Namespace, job: JobEnd) -> Any:
    """The checked broker and bucket of an MQTT_S3 job, both answering; from here on a failure tells the peers
    through the broker and deletes the run's S3 objects."""
    from fedml_progfed.config import flatten
    from fedml_progfed.fedml_plugin.mqtt_s3_comm import delete_run_objects, send_abort_notices
    from fedml_progfed.fedml_plugin.mqtt_s3_settings import MQTT_KEY, S3_KEY, has_both, mqtt_s3_settings, probe

    if config.progfed.round_deadline_s is not None:
        from fedml_progfed.errors import FieldError

        raise FieldError("progfed.round_deadline_s", "is gRPC-only (MQTT_S3 waits for every selected client); "
                                                     "remove it or use comm_args.backend: GRPC")
    flat = flatten(sections)
    if _truthy(ns.using_mlops) and not has_both(flat):  # deployed by FedML's agents: the platform names them
        from fedml.core.mlops.mlops_configs import MLOpsConfigs

        mqtt, s3, _, _ = MLOpsConfigs.fetch_all_configs()
        flat = {**flat, MQTT_KEY: flat.get(MQTT_KEY) or mqtt, S3_KEY: flat.get(S3_KEY) or s3}
    settings = mqtt_s3_settings(flat, str(ns.run_id))  # offline, a missing key fails here, before any network call
    probe(settings)
    parties = config.client_num_per_round + 1

    def notify(reason: str, skip: int | None) -> None:
        send_abort_notices(settings, job.rank, parties, reason, skip)
        delete_run_objects(settings)  # the job is over for everyone: whoever ends it cleans up (a killed server cannot)

    job.notify = notify
    return settings


def _tell_peers_on_failure(job: JobEnd, settings: Any) -> None:
    """From here on a failure of this party sends abort notices (our wire format, its credentials)."""
    from fedml_progfed.fedml_plugin.grpc_dial import Dialer, send_abort_notices

    dialer = Dialer(job.rank, settings)
    job.notify = lambda reason, skip: send_abort_notices(dialer, reason, skip)


def _init_fedml(sections: dict, config, ns: argparse.Namespace) -> Any:
    """FedML's arguments, initialised offline (or through FedML's platform when its agents deployed the job)."""
    from fedml_progfed.fedml_plugin.offline import init_fedml_offline

    args = fedml_arguments(sections, ns)
    if config.backend == "GRPC":
        args.grpc_ipconfig_path = str(resolve_config_path(config.grpc_ipconfig_path, ns.cf))
    if _truthy(ns.using_mlops):
        import fedml

        args.using_mlops = True  # deployed by FedML's agents: the platform is the user's choice
        return fedml.init(args, check_env=False)
    return init_fedml_offline(args)


def _write_server_results(out: Path, sections: dict, config, fed: Any, options: Any, started_at: float) -> None:
    """Rank 0's results folder, with what only a cross-silo run knows: start-up time, world, devices, wire bytes."""
    from fedml_progfed.runners.experiment import write_results

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
        if config.backend == "MQTT_S3":  # what our MQTT_S3 manager meters (fedml_plugin/mqtt_s3_comm.py)
            wire["counted"] = ("S3 object bytes (our JSON header and raw tensors) + MQTT payload bytes (JSON) of every "
                               "message, control messages and dropped messages included; MQTT and HTTP headers, TLS "
                               "and TCP/IP not counted")
        extra["wire"] = wire
    from fedml_progfed.config import redacted

    summary = write_results(out, redacted(sections), fed, config.progfed.strategy, runtime="cross_silo", extra=extra)
    log.info(
        "done: final %s %.4f, two-way %.2f MB, start-up of %d processes %.1f s -> %s",
        summary["metric_name"], summary["final_metric"] or float("nan"), summary["total_bytes"] / 1e6,
        parties, startup_s or float("nan"), out,
    )
