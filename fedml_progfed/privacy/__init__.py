"""Differential privacy for a model that grows: client-level DP-FedAvg (McMahan et al., ICLR 2018)
and the accounting of record-level DP-SGD (Abadi et al., CCS 2016).

* :mod:`.clip` bounds a client's whole update (every uploaded tensor as one vector) in L2 norm.
* :mod:`.accountant` turns the rounds a run did into (epsilon, delta) with Google's
  ``dp-accounting`` library, for the sampling the run actually does.
* :mod:`.record` keeps each client's epsilon of record-level DP-SGD (the clients train
  with :mod:`fedml_progfed.core.private_sgd`).
* :mod:`.mechanism` is the server's half: who takes part in a round (a secret draw), the noised
  sum of the clipped updates over a fixed denominator, and the state a checkpoint keeps.

Nothing here imports the algorithms or the engine; they call in.
"""

from fedml_progfed.privacy.accountant import PrivacyAccountant, RoundEvent
from fedml_progfed.privacy.clip import clip_to_norm, l2_norm
from fedml_progfed.privacy.mechanism import ClientLevelDP, PrivacySettings
from fedml_progfed.privacy.record import RecordLevelDP

__all__ = ["ClientLevelDP", "PrivacyAccountant", "PrivacySettings", "RecordLevelDP", "RoundEvent", "clip_to_norm",
           "l2_norm"]
