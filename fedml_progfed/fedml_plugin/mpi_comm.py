"""FedML's MPI comm manager with a blocking loop and the same deadlines as gRPC.

FedML 0.9.6's ``MpiCommunicationManager.handle_receive_message`` wakes every
0.1 ms to poll its queue, and nothing bounds a wait: a SIGSTOPped rank makes the
server wait forever (FEDML_NOTES, "Failure behaviour"). Here the loop blocks on
the queue and the watchdog ends the job (``MPI.COMM_WORLD.Abort`` through the
runtime's ``fatal``) when a peer is overdue, even while the main thread is stuck
in a send to the stopped rank. A killed rank already ends an MPI job (MPICH).
"""

from __future__ import annotations

from typing import Any

from fedml.core.distributed.communication.mpi.com_manager import MpiCommunicationManager

from fedml_progfed.fedml_plugin.comm import CommOptions, WatchedComm


class ProgFedMpiCommManager(WatchedComm, MpiCommunicationManager):
    """``MpiCommunicationManager`` plus :class:`~fedml_progfed.fedml_plugin.comm.WatchedComm`."""

    def __init__(self, comm: Any, rank: int, size: int, *, options: CommOptions) -> None:
        self._setup_watch(int(rank), int(size), options)
        super().__init__(comm, rank, size)

    def send_message(self, msg: Any) -> None:
        self._stamp_device(msg)
        super().send_message(msg)
        self._after_send(msg)

    def handle_receive_message(self) -> None:
        self._notify_connection_ready()
        self._receive_loop()

    def _running(self) -> bool:
        return not self._stop_running

    def _next_message(self, timeout: float) -> Any:
        return self.q_receiver.get(timeout=timeout)

