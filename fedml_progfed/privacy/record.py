"""The server's ledger of record-level DP-SGD (Abadi et al., CCS 2016): each client's epsilon.

Every client trains with DP-SGD inside its silo (:mod:`fedml_progfed.core.private_sgd`) and
reports what its Opacus run did: the records it sampled from, the noised steps, the
sampling rate. The server charges that client's own accountant with those steps (each a
Poisson-subsampled Gaussian, the add/remove-one-record relation), over the rounds the
client took part in, and keeps all of them in its checkpoints: a cross-silo client that
restarts forgets, the server does not. The run's ``epsilon`` is the largest any client spent.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from fedml_progfed.core.private_sgd import PrivateSteps
from fedml_progfed.privacy.accountant import PrivacyAccountant, RoundEvent

log = logging.getLogger("fedml_progfed")


class RecordLevelDP:
    """Per-client accountants of DP-SGD.

    Parameters
    ----------
    noise_multiplier, delta
        DP-SGD's ``z`` (the same on every client) and the delta epsilon is reported at.
    accountant
        ``rdp`` or ``pld``.
    target
        Every client's budget (``None``: none): a client whose next round, taken as its last one
        again, would pass it is not called any more.
    """

    def __init__(self, noise_multiplier: float, delta: float, accountant: str = "rdp", target: float | None = None) -> None:
        self.noise_multiplier, self.delta, self.accountant_name, self.target = noise_multiplier, delta, accountant, target
        self.clients: dict[int, PrivacyAccountant] = {}
        self._last: dict[int, PrivateSteps] = {}
        self.stopped: dict[int, int] = {}  # client -> the first round it was not called for its budget

    def _accountant(self, client: int) -> PrivacyAccountant:
        if client not in self.clients:
            self.clients[client] = PrivacyAccountant(self.noise_multiplier, self.delta, "poisson", self.accountant_name)
        return self.clients[client]

    def charge(self, client: int, steps: PrivateSteps) -> None:
        """One round of ``client``'s DP-SGD: ``steps.steps`` Poisson-sampled Gaussian steps."""
        if client not in self.clients and self.delta >= 1 / steps.population:
            log.warning("delta %g is at least 1 / the %d records of client %d: a mechanism that publishes one of its "
                        "records in the clear meets it; use a delta well below 1 / %d", self.delta, steps.population,
                        client, steps.population)
        self._accountant(client).record(RoundEvent(steps.population, rate=steps.sample_rate), steps.steps)
        self._last[client] = steps

    def would_pass(self, client: int, steps: PrivateSteps) -> bool:
        """Whether a round of ``steps`` would take ``client`` past the target (a client checks its first round so)."""
        if self.target is None:
            return False
        accountant = self.clients.get(client) or PrivacyAccountant(self.noise_multiplier, self.delta, "poisson",
                                                                   self.accountant_name)
        return accountant.epsilon({RoundEvent(steps.population, rate=steps.sample_rate): steps.steps}) > self.target

    def exhausted(self, client: int, round_idx: int) -> bool:
        """Whether one more round like ``client``'s last would take it past the target (then it is left out)."""
        if self.target is None or client not in self._last:
            return client in self.stopped
        last = self._last[client]
        if client not in self.stopped and self.clients[client].epsilon(
                {RoundEvent(last.population, rate=last.sample_rate): last.steps}) > self.target:
            self.stopped[client] = round_idx
            log.warning("round %d: client %d would pass the target epsilon %g with one more round (now %.3f); it is "
                        "not called again", round_idx, client, self.target, self.clients[client].epsilon())
        return client in self.stopped

    def epsilon(self) -> float:
        """The largest epsilon any client has spent (0 before any round)."""
        return max((a.epsilon() for a in self.clients.values()), default=0.0)

    def summary(self) -> dict[str, Any]:
        per_client = {str(c): a.epsilon() for c, a in sorted(self.clients.items())}
        name = PrivacyAccountant(self.noise_multiplier, self.delta, "poisson", self.accountant_name).describe()
        return {"level": "record", "epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "accountant": name.replace("add/remove-one client", "add/remove-one record, per client"),
                "epsilon_per_client": per_client, "target_epsilon": self.target,
                "stopped_clients": {str(c): r for c, r in sorted(self.stopped.items())}}

    def state_dict(self) -> dict[str, Any]:
        return {"clients": {str(c): a.state_dict() for c, a in self.clients.items()},
                "last": {str(c): [s.population, s.steps, s.sample_rate] for c, s in self._last.items()},
                "stopped": {str(c): r for c, r in self.stopped.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.clients = {}
        for client, events in state["clients"].items():
            self._accountant(int(client)).load_state_dict(events)
        self._last = {int(c): PrivateSteps(int(p), int(s), float(r)) for c, (p, s, r) in state["last"].items()}
        self.stopped = {int(c): int(r) for c, r in state["stopped"].items()}
