"""A client's rounds to run, read from the header of the server's first model (so a resumed server needs nothing from clients)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def rounds_after(wire: Any, total_rounds: int) -> int | None:
    """The rounds a client runs when the server's first model is of round ``header.round``.

    Parameters
    ----------
    wire
        FedML's ``model_params`` of the server's first message.
    total_rounds
        The run's rounds (warm-up rounds included).

    Returns
    -------
    int or None
        ``total_rounds - header.round``; ``None`` when ``wire`` is not our message (the trainer names the problem).
    """
    from fedml_progfed.comm.messages import HEADER_KEY, Header

    if not isinstance(wire, Mapping) or HEADER_KEY not in wire:
        return None
    return max(0, total_rounds - Header.from_tensor(wire[HEADER_KEY], "the server's first model").round)
