"""Who owes this process a message, and since when: the deadlines that keep a cross-silo job from hanging.

FedML's cross-silo runtimes wait forever: a server whose client stopped waits for
its update, a client whose server stopped waits for the next model (FEDML_NOTES,
"Failure behaviour"). :class:`PeerWatch` keeps one deadline per peer that owes
this process a reply; :class:`Watchdog` checks them from its own thread, so a
main thread blocked in a send cannot hide an overdue peer, and hands the first
overdue peer to the runtime's ``fatal`` callback as a :class:`PeerError`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from fedml_progfed.errors import PeerError


@dataclass(frozen=True)
class Owed:
    """A reply a peer owes: what it is, when it was asked for, and by when it must come."""

    what: str
    since: float
    deadline: float
    timeout_s: float


class PeerWatch:
    """Deadlines per peer rank; thread-safe.

    Parameters
    ----------
    describe
        ``rank -> "client rank 2 (127.0.0.1:8892)"``: how errors name a peer.
    timeout_key
        The setting that bounds the wait, as users write it (named in every error).
    clock
        Monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        describe: Callable[[int], str],
        timeout_key: str = "progfed_args.progfed_round_timeout_s",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.describe = describe
        self.timeout_key = timeout_key
        self.clock = clock
        self._owed: dict[int, Owed] = {}
        self._heard: set[int] = set()
        self._lock = threading.Lock()

    def expect(self, rank: int, what: str, timeout_s: float | None) -> None:
        """``rank`` owes a reply (``what``) within ``timeout_s`` from now; ``None`` waits forever."""
        if timeout_s is None:
            return
        now = self.clock()
        with self._lock:
            self._owed[rank] = Owed(what, now, now + timeout_s, timeout_s)

    def heard(self, rank: int) -> None:
        """A message from ``rank`` arrived: it owes nothing any more."""
        with self._lock:
            self._owed.pop(rank, None)
            self._heard.add(rank)

    def clear(self) -> None:
        """Nobody owes anything (the run ended normally)."""
        with self._lock:
            self._owed.clear()

    def has_heard(self, rank: int) -> bool:
        with self._lock:
            return rank in self._heard

    def pending(self) -> dict[int, Owed]:
        with self._lock:
            return dict(self._owed)

    def overdue(self) -> PeerError | None:
        """The error for the peers whose deadline passed (all of them named), or ``None``."""
        now = self.clock()
        late = sorted((rank, owed) for rank, owed in self.pending().items() if owed.deadline <= now)
        if not late:
            return None
        parts = [f"{self.describe(rank)} sent nothing for {now - owed.since:.0f} s ({owed.what})" for rank, owed in late]
        timeout = late[0][1].timeout_s
        return PeerError(
            "; ".join(parts) + f"; the wait is bounded by {self.timeout_key} ({timeout:g} s): the peer is stopped, "
            f"overloaded or unreachable. FedML's cross-silo runtime cannot go on without a selected client, so the "
            f"job ends",
            peer=late[0][0],
        )


class Watchdog(threading.Thread):
    """A daemon thread that checks a :class:`PeerWatch` (and optional liveness probes) every ``tick_s``.

    Parameters
    ----------
    watch
        The deadlines to check.
    fatal
        Called once with the first :class:`PeerError`; it ends the process (it does not return).
    probe
        ``rank -> PeerError | None``: a cheap check that a peer still exists (gRPC: its port
        still accepts connections). Called for peers that owe a reply and were heard from before.
    tick_s
        Seconds between checks: an overdue peer is noticed at most this late.
    """

    def __init__(
        self,
        watch: PeerWatch,
        fatal: Callable[[BaseException], None],
        probe: Callable[[int], PeerError | None] | None = None,
        tick_s: float = 0.5,
    ) -> None:
        super().__init__(name="progfed-watchdog", daemon=True)
        self.watch = watch
        self.fatal = fatal
        self.probe = probe
        self.tick_s = tick_s
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.tick_s):
            error = self.watch.overdue() or self._probe(self.watch.pending())
            if error is not None and not self._halt.is_set():
                self.fatal(error)
                return

    def _probe(self, ranks: Iterable[int]) -> PeerError | None:
        if self.probe is None:
            return None
        for rank in ranks:
            if self.watch.has_heard(rank):
                error = self.probe(rank)
                if error is not None:
                    return error
        return None

    def stop(self) -> None:
        self._halt.set()
