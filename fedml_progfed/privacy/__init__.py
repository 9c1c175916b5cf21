"""Client-level differential privacy (DP-FedAvg, McMahan et al., ICLR 2018) for a model that grows.

* :mod:`.clip` bounds a client's whole update (every uploaded tensor as one vector) in L2 norm.
* :mod:`.accountant` turns the rounds a run did into (epsilon, delta) with Google's
  ``dp-accounting`` library, for the sampling the run actually does.
* :mod:`.mechanism` is the server's half: who takes part in a round (a secret draw), the noised
  sum of the clipped updates over a fixed denominator, and the state a checkpoint keeps.

Nothing here imports the algorithms or the engine; they call in.
"""

from fedml_progfed.privacy.accountant import PrivacyAccountant, RoundEvent
from fedml_progfed.privacy.clip import clip_to_norm, l2_norm
from fedml_progfed.privacy.mechanism import ClientLevelDP, PrivacySettings

__all__ = ["ClientLevelDP", "PrivacyAccountant", "PrivacySettings", "RoundEvent", "clip_to_norm", "l2_norm"]
