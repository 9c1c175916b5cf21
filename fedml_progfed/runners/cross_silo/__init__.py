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

One job per module:

- :mod:`.arguments`: FedML's ``Arguments`` from our resolved sections;
- :mod:`.rules`: what only cross-silo runs forbid;
- :mod:`.lifecycle`: the first failure or signal becomes one error line and the job's end;
- :mod:`.endpoints`: the gRPC ip-config, parties per host, a dry run's transport line;
- :mod:`.rounds`: a client's rounds, from the header of the server's first model;
- :mod:`.wire`: wire bytes against payload bytes;
- :mod:`.run`: one party's run.

Every module imports FedML, gRPC and torch only when called, so importing this package is cheap.
"""

from fedml_progfed.runners.cross_silo.arguments import FEDML_CLI_DEFAULTS, fedml_arguments
from fedml_progfed.runners.cross_silo.endpoints import (
    describe_transport,
    grpc_endpoints,
    processes_on_this_host,
    resolve_config_path,
)
from fedml_progfed.runners.cross_silo.lifecycle import JobEnd, Terminated, describe_failure
from fedml_progfed.runners.cross_silo.rounds import rounds_after
from fedml_progfed.runners.cross_silo.rules import check_cross_silo
from fedml_progfed.runners.cross_silo.run import run_cross_silo
from fedml_progfed.runners.cross_silo.wire import wire_summary

__all__ = [
    "FEDML_CLI_DEFAULTS",
    "JobEnd",
    "Terminated",
    "check_cross_silo",
    "describe_failure",
    "describe_transport",
    "fedml_arguments",
    "grpc_endpoints",
    "processes_on_this_host",
    "resolve_config_path",
    "rounds_after",
    "run_cross_silo",
    "wire_summary",
]
