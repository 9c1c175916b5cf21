"""Drive the engine's server the way the FedML adapter does, for tests that talk to the engine directly.

The server works in two halves (``start_round`` / ``finish_round``); a runtime chains them.
These two helpers are that chaining, nothing more.
"""

from __future__ import annotations

from typing import Any, Sequence


def broadcast(server, client: int | None = None) -> Any:
    """The current round's messages, or the one ``client`` is sent (starting the round if none is open,
    as FedML's first call does)."""
    current = server.current or server.start_round()
    return current.wire if client is None else current.message(client)


def aggregate(server, uploads: Sequence, test_batches=None, device=None) -> Any:
    """Finish the current round with ``uploads`` and start the next; returns its messages."""
    if server.current is None:
        server.start_round()
    server.finish_round(uploads, test_batches, device)
    return server.start_round().wire
