"""Privacy accounting with Google's ``dp-accounting`` library (RDP or PLD), never a formula of ours.

Each round that trains anybody is one subsampled Gaussian event; the run is their
composition. The event matches the sampling the run does:

* ``fixed`` (FedML's rounds: ``m`` of the ``n`` eligible clients without replacement):
  ``SampledWithoutReplacementDpEvent(n, m, Gaussian)`` under the **replace-one** relation
  (Wang, Balle, Kasiviswanathan, AISTATS 2019, Thm. 27). Replacing one client's clipped
  update changes the noised sum by up to ``2C``, so the Gaussian's multiplier relative to that
  sensitivity is ``z / 2``: the accountant is given ``z / 2``.
* ``poisson`` (each eligible client takes part with probability ``q``):
  ``PoissonSampledDpEvent(q, Gaussian(z))`` under **add/remove-one** (sensitivity ``C``).

``n`` is the round's eligible set (memory budgets may shrink it), so a round is charged
the largest sampling rate any client faced in it.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

# dp-accounting logs one warning per RDP order it cannot evaluate (they are left out, as they should be)
logging.getLogger("absl").setLevel(logging.ERROR)

SAMPLINGS = ("fixed", "poisson")
ACCOUNTANTS = ("rdp", "pld")
#: The neighbouring relation each sampling gives, as the README and summary.json name it.
RELATIONS = {"fixed": "replace-one client", "poisson": "add/remove-one client"}


@dataclass(frozen=True, order=True)
class RoundEvent:
    """One round's sampling: ``sampled`` of ``population`` clients (fixed) or each with ``rate`` (poisson)."""

    population: int
    sampled: int = 0
    rate: float = 0.0

    def as_list(self) -> list:
        return [self.population, self.sampled, self.rate]

    @classmethod
    def from_list(cls, values: Iterable) -> "RoundEvent":
        population, sampled, rate = values
        return cls(int(population), int(sampled), float(rate))


class PrivacyAccountant:
    """The (epsilon, delta) of the rounds recorded so far (see the module docstring).

    Parameters
    ----------
    noise_multiplier
        ``z``: the noise's standard deviation is ``z C``.
    delta
        The delta at which epsilon is reported.
    sampling
        ``fixed`` or ``poisson``.
    accountant
        ``rdp`` or ``pld`` (PLD supports Poisson sampling only).
    """

    def __init__(self, noise_multiplier: float, delta: float, sampling: str, accountant: str = "rdp") -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling {sampling!r}: use {' | '.join(SAMPLINGS)}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant {accountant!r}: use {' | '.join(ACCOUNTANTS)}")
        if accountant == "pld" and sampling == "fixed":
            raise ValueError("the PLD accountant supports Poisson sampling only; use rdp, or poisson sampling")
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.sampling = sampling
        self.accountant = accountant
        self.events: Counter[RoundEvent] = Counter()
        self._cache: tuple[tuple, float] | None = None

    def record(self, event: RoundEvent, count: int = 1) -> None:
        """Charge ``count`` rounds (or DP-SGD steps) of ``event``."""
        self.events[event] += count

    def epsilon(self, extra: Mapping[RoundEvent, int] | None = None) -> float:
        """Epsilon at :attr:`delta` of the recorded rounds plus ``extra`` (rounds not yet run)."""
        events = Counter(self.events)
        events.update(extra or {})
        key = tuple(sorted(events.items()))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        value = self._epsilon(events)
        self._cache = (key, value)
        return value

    def _epsilon(self, events: Mapping[RoundEvent, int]) -> float:
        charged = {e: n for e, n in events.items() if n > 0 and (e.sampled > 0 or e.rate > 0)}
        if not charged:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        composed = dp_accounting.ComposedDpEvent(
            [dp_accounting.SelfComposedDpEvent(self._event(e), n) for e, n in sorted(charged.items())]
        )
        accountant = self._new_accountant()
        accountant.compose(composed)
        return float(accountant.get_epsilon(self.delta))

    def _event(self, event: RoundEvent) -> dp_accounting.DpEvent:
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(min(1.0, event.rate), dp_accounting.GaussianDpEvent(self.noise_multiplier))
        # replace-one: the noised sum's sensitivity is 2C (see the module docstring)
        sampled = min(event.sampled, event.population)
        return dp_accounting.SampledWithoutReplacementDpEvent(
            event.population, sampled, dp_accounting.GaussianDpEvent(self.noise_multiplier / 2)
        )

    def _new_accountant(self) -> Any:
        if self.accountant == "pld":
            return pld_privacy_accountant.PLDAccountant()
        relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if self.sampling == "fixed"
                    else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)

    @property
    def relation(self) -> str:
        return RELATIONS[self.sampling]

    def describe(self) -> str:
        """e.g. ``RDP accountant (dp-accounting), fixed sampling, replace-one client``."""
        return f"{self.accountant.upper()} accountant (dp-accounting), {self.sampling} sampling, {self.relation}"

    def state_dict(self) -> list[list]:
        """The recorded rounds as ``[[population, sampled, rate, count], ...]`` (JSON)."""
        return [[*e.as_list(), n] for e, n in sorted(self.events.items())]

    def load_state_dict(self, state: Iterable[Iterable]) -> None:
        self.events = Counter({RoundEvent.from_list(row[:3]): int(row[3]) for row in state})
        self._cache = None
