"""A cross-silo process's end: the first exception, in any thread, or a signal becomes one error line and the job's end."""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from typing import Any


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
            # a party that cannot even listen (its rank runs elsewhere) must not end that other job
            if self.notify is not None and getattr(exc, "tell_peers", True):
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
