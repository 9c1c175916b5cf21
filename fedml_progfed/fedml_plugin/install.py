"""Put our comm managers where FedML's cross-silo runtime looks for its own, for the length of a run.

FedML's cross-silo managers (``FedMLServerManager``, ``ClientMasterManager``) build
their transport in ``FedMLCommManager._init_manager`` by importing the class from
its module at call time, so replacing that module attribute is enough. This
module sits above the transports (:mod:`~fedml_progfed.fedml_plugin.grpc_comm`,
:mod:`~fedml_progfed.fedml_plugin.mpi_comm`, :mod:`~fedml_progfed.fedml_plugin.mqtt_s3_comm`), which sit above what they share
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


def _mqtt_s3() -> Transport:
    import fedml.core.distributed.communication.mqtt_s3.mqtt_s3_multi_clients_comm_manager as module

    from fedml_progfed.fedml_plugin.mqtt_s3_comm import ProgFedMqttS3CommManager

    return module, "MqttS3MultiClientsCommManager", ProgFedMqttS3CommManager


#: Backends we have our own manager for; any other keeps FedML's.
TRANSPORTS: dict[str, Callable[[], Transport]] = {"GRPC": _grpc, "MPI": _mpi, "MQTT_S3": _mqtt_s3}


@contextlib.contextmanager
def comm_managers_installed(backend: str, options: CommOptions, **transport: Any) -> Iterator[None]:
    """Make FedML's runtime build our manager for ``backend`` (``GRPC``, ``MPI`` or ``MQTT_S3``) while inside.

    Parameters
    ----------
    backend
        FedML's ``comm_args.backend``; a backend without a manager of ours is left alone.
    options
        Deadlines, the ``fatal`` callback, device and meter, given to every manager built.
    **transport
        Passed on to the manager's constructor (gRPC and MQTT_S3: ``settings``).
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


@contextlib.contextmanager
def silo_sampling_installed() -> Iterator[None]:
    """Make FedML's cross-silo server ask our aggregator which data silos a round trains.

    ``FedMLAggregator.data_silo_selection`` (``cross_silo/server/fedml_aggregator.py``) seeds
    numpy with FedML's own round counter, which restarts at 0 on resume; while inside, it
    calls the wrapped aggregator's ``data_silo_selection`` when it has one
    (:meth:`~fedml_progfed.fedml_plugin.aggregator.ProgFedServerAggregator.data_silo_selection`).
    """
    from fedml.cross_silo.server.fedml_aggregator import FedMLAggregator

    original = FedMLAggregator.data_silo_selection

    def ours_first(self: Any, round_idx: int, client_num_in_total: int, client_num_per_round: int) -> list[int]:
        select = getattr(self.aggregator, "data_silo_selection", None)
        if select is None:
            return original(self, round_idx, client_num_in_total, client_num_per_round)
        return select(round_idx, client_num_in_total, client_num_per_round)

    FedMLAggregator.data_silo_selection = ours_first
    try:
        yield
    finally:
        FedMLAggregator.data_silo_selection = original
