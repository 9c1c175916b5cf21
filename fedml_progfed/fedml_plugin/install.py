"""Put our comm managers where FedML's cross-silo runtime looks for its own, for the length of a run.

FedML's cross-silo managers (``FedMLServerManager``, ``ClientMasterManager``) build
their transport in ``FedMLCommManager._init_manager`` by importing the class from
its module at call time, so replacing that module attribute is enough. This
module sits above the transports (:mod:`~fedml_progfed.fedml_plugin.grpc_comm`,
:mod:`~fedml_progfed.fedml_plugin.mpi_comm`), which sit above what they share
(:mod:`~fedml_progfed.fedml_plugin.comm`): imports point one way.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any, Callable, Iterator

from fedml_progfed.fedml_plugin.comm import CommOptions

#: What replacing one backend's manager needs: FedML's module, the class name it looks up, our class.
Transport = tuple[ModuleType, str, type]


def _grpc() -> Transport:
    # Imported when a run asks for it: gRPC and mpi4py are heavy, and a job uses one of them.
    import fedml.core.distributed.communication.grpc.grpc_comm_manager as module

    from fedml_progfed.fedml_plugin.grpc_comm import ProgFedGRPCCommManager

    return module, "GRPCCommManager", ProgFedGRPCCommManager


def _mpi() -> Transport:
    import fedml.core.distributed.communication.mpi.com_manager as module

    from fedml_progfed.fedml_plugin.mpi_comm import ProgFedMpiCommManager

    return module, "MpiCommunicationManager", ProgFedMpiCommManager


#: Backends we have our own manager for; any other (``MQTT_S3``) keeps FedML's.
TRANSPORTS: dict[str, Callable[[], Transport]] = {"GRPC": _grpc, "MPI": _mpi}


@contextlib.contextmanager
def comm_managers_installed(backend: str, options: CommOptions, **transport: Any) -> Iterator[None]:
    """Make FedML's runtime build our manager for ``backend`` (``GRPC`` or ``MPI``) while inside.

    Parameters
    ----------
    backend
        FedML's ``comm_args.backend``; a backend without a manager of ours is left alone.
    options
        Deadlines, the ``fatal`` callback, device and meter, given to every manager built.
    **transport
        Passed on to the manager's constructor (gRPC: ``endpoints``).
    """
    if backend not in TRANSPORTS:
        yield
        return
    module, name, ours = TRANSPORTS[backend]()
    original = getattr(module, name)

    def build(*args: Any, **kwargs: Any):
        return ours(*args, options=options, **transport, **kwargs)

    setattr(module, name, build)
    try:
        yield
    finally:
        setattr(module, name, original)
