"""Seeded client dropout (``progfed.client_dropout``): which sampled clients stay silent in a round.

The decision is a pure function of (run seed, round, client), drawn from a generator of its
own, so it is the same in every runtime and process (standalone, MPI, gRPC), whatever order
the clients are called in, and it consumes nothing of the random streams training uses: the
clients that do train produce bit-identical updates with or without dropout.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def stays_silent(seed: int, round_idx: int, client: int, p: float) -> bool:
    """Whether ``client`` stays silent in round ``round_idx`` of a run seeded ``seed``.

    Parameters
    ----------
    seed
        The run seed (``random_seed``), a non-negative integer.
    round_idx
        The round the client was sampled for (the broadcast header's ``round``).
    client
        The data silo's index (the update header's ``client``).
    p
        The probability of silence, ``progfed.client_dropout``, in ``[0, 1)``.

    Returns
    -------
    bool
        True with probability ``p``, independently for every (seed, round, client).
    """
    if p <= 0.0:
        return False  # no generator is built: runs without dropout pay nothing
    if seed < 0 or round_idx < 0 or client < 0:
        raise ValueError(f"stays_silent: seed {seed}, round {round_idx} and client {client} must be >= 0")
    # A SeedSequence over the three numbers: distinct triples give independent streams.
    return bool(np.random.default_rng([seed, round_idx, client]).random() < p)


def silent_clients(seed: int, round_idx: int, clients: Iterable[int], p: float) -> list[int]:
    """The clients of ``clients`` that :func:`stays_silent` picks in ``round_idx``, ascending."""
    return sorted(c for c in clients if stays_silent(seed, round_idx, c, p))
