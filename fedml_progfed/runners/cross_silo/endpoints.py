"""Where the parties of a gRPC job listen: the checked ip-config, parties per host, a dry run's transport line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily below: a dry run of an MPI job needs no gRPC
    from fedml_progfed.config import RunConfig
    from fedml_progfed.fedml_plugin.grpc_dial import Endpoint


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


def job_endpoints(config: RunConfig, config_file: str | os.PathLike | None, rank: int | None, needed_by: str
                  ) -> dict[int, Endpoint]:
    """The checked ip-config of the job's ``client_num_per_round + 1`` parties, and ``rank`` (if given) among them.

    Raises
    ------
    FieldError
        No ``grpc_ipconfig_path`` (``needed_by`` says who needs it and how to get one).
    ConfigError
        A bad ip-config, or a ``rank`` outside the job.
    """
    from fedml_progfed.errors import ConfigError, FieldError
    from fedml_progfed.fedml_plugin.grpc_dial import read_ip_config

    if not config.grpc_ipconfig_path:
        raise FieldError("grpc_ipconfig_path", needed_by)
    parties = config.client_num_per_round + 1
    endpoints = read_ip_config(resolve_config_path(config.grpc_ipconfig_path, config_file), parties)
    if rank is not None and not 0 <= rank < parties:
        raise ConfigError(f"--rank {rank}: a gRPC job of {parties} parties has ranks 0 (server) to {parties - 1}")
    return endpoints


def grpc_endpoints(config: RunConfig, rank: int, role: str, config_file: str | None) -> dict[int, Endpoint]:
    """The checked ip-config of a gRPC job; errors name the key or the command-line flag.

    Raises
    ------
    FieldError
        No ``grpc_ipconfig_path``.
    ConfigError
        A ``--rank`` outside the job, or one that does not match ``--role``.
    """
    from fedml_progfed.errors import ConfigError

    endpoints = job_endpoints(config, config_file, rank, needed_by="backend GRPC needs the ip-config every party "
                              "shares (CSV: eid,rank,grpc_server_ip,grpc_server_port); run_scripts/"
                              "run_grpc_cross_silo.sh writes one for a single machine")
    if (rank == 0) != (role == "server"):
        raise ConfigError(f"--rank {rank} --role {role}: rank 0 is the server and every other rank a client")
    return endpoints


def processes_on_this_host(endpoints: dict[int, Endpoint], rank: int) -> int:
    """Parties of a gRPC job that share this machine (same listen address, or all on loopback)."""
    from fedml_progfed.fedml_plugin.grpc_tls import is_loopback

    own = endpoints[rank].host
    return sum(1 for e in endpoints.values() if e.host == own or (is_loopback(e.host) and is_loopback(own)))


def describe_transport(config: RunConfig, rank: int, config_file: str | None) -> str:
    """One line for a dry run: which backend this party would use, and its endpoints."""
    backend = config.backend
    if backend == "GRPC":
        role = "server" if rank == 0 else "client"
        endpoints = grpc_endpoints(config, rank, role, config_file)
        own = endpoints[rank]
        peers = ", ".join(f"{r}={e.address}" for r, e in sorted(endpoints.items()) if r != rank)
        p = config.progfed
        if p.tls_ca:
            security = f"mutual TLS, CA {p.tls_ca}"
        else:
            from fedml_progfed.fedml_plugin.grpc_tls import exposed_addresses

            security = ("plain TCP off loopback (progfed_allow_insecure)" if exposed_addresses(endpoints)
                        else "plain TCP on loopback")
        return (f"transport GRPC: rank {rank} listens on {own.host}:{own.port}, peers {peers} "
                f"(ip-config {resolve_config_path(config.grpc_ipconfig_path, config_file)}; {security}; "
                f"no pickles on the wire)")
    if backend == "MQTT_S3":
        return _describe_mqtt_s3(rank, config_file)
    if backend == "MPI":
        return f"transport MPI: {config.client_num_per_round + 1} processes under mpirun"
    return f"transport {backend}"


def _describe_mqtt_s3(rank: int, config_file: str | None) -> str:
    """The broker and bucket named in the config file (no credential, no network call)."""
    from fedml_progfed.config import flatten, read_yaml
    from fedml_progfed.fedml_plugin.mqtt_s3_settings import has_both, mqtt_s3_settings

    flat = flatten(read_yaml(config_file)) if config_file else {}
    if not has_both(flat):
        return ("transport MQTT_S3: MQTT broker and S3 bucket from FedML's platform (the Octopus agents supply them "
                "under --using_mlops true; offline, set comm_args.customized_training_mqtt_config and "
                "customized_training_s3_config)")
    settings = mqtt_s3_settings(flat, "<run_id>")
    return (f"transport MQTT_S3: rank {rank} via {settings.describe()} (topics and S3 keys under "
            f"progfed/<run_id>/; no pickles on the wire)")
