"""Which data silos a round trains: one rule for standalone, MPI and gRPC, keyed by the run's own round.

FedML's cross-silo server draws a round's silos with ``np.random.seed(round_idx)`` on the
round counter it keeps itself, which starts again at 0 when a job resumes from a
checkpoint; a resumed job would then train other silos than the run it continues. The
rule here is FedML's (so runs that never resume are unchanged), fed with the engine's
round index, which a checkpoint restores.
"""

from __future__ import annotations

import numpy as np


def sample_clients(round_idx: int, client_num_in_total: int, client_num_per_round: int) -> list[int]:
    """The data-silo indices of round ``round_idx``.

    Without replacement within a round, seeded per round (so with replacement across
    rounds, Reddi et al. 2021). FedML seeds with the round index and, after round 0, draws
    the next round's clients before it increments the index, so round ``r >= 1`` uses
    seed ``r - 1``; the rule keeps that, so every runtime agrees with FedML's own runs.
    """
    if client_num_in_total == client_num_per_round:
        return list(range(client_num_in_total))
    seed = max(round_idx - 1, 0)
    return [int(i) for i in np.random.RandomState(seed).choice(range(client_num_in_total), client_num_per_round, replace=False)]
