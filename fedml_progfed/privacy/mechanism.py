"""The server's half of client-level DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018, Alg. 1).

Per round: a secret draw of the participants among the eligible clients (fixed-size or
Poisson), every received update clipped to ``C`` again (what the sensitivity rests on is
enforced here, not trusted to the clients), their **sum** plus ``N(0, (z C)^2)`` on every
coordinate, drawn once, divided by the round's **expected** number of participants. The
denominator is fixed before any update arrives, so a dropped, silent or absent client
cannot change the scale. What follows the noised mean (the server optimizer, growth,
head replacement, a step change) is post-processing.

With adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021) the bound follows
a target quantile ``gamma`` of the clients' update norms: each round the server counts the
updates inside the bound (bits centred at 1/2, so one client moves the count by at most 1/2
under add/remove and 1 under replace-one), noises the count with ``N(0, sigma_b^2)``, and moves
``C <- C exp(-eta (count / expected - gamma))``. The count is a second Gaussian query on the
same clients, so the update's noise multiplier becomes ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2``
and the pair costs exactly what one Gaussian of multiplier ``z`` costs (their Thm. 1): the
accountant is charged ``z``, unchanged. The clients then send unclipped updates and the server
(trusted with them, as central DP is) clips at the current bound.

The draws come from a secret seed (``progfed_dp_noise_seed`` when set, else random at
the start of the run) kept in the server's checkpoints only: whoever knows it can remove
the noise.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedml_progfed.config.schema import RunConfig
from fedml_progfed.core.seeding import derive_seed
from fedml_progfed.privacy.accountant import PrivacyAccountant, RoundEvent
from fedml_progfed.privacy.clip import clip_to_norm

log = logging.getLogger("fedml_progfed")
ON_BUDGET = ("refuse", "stop")


@dataclass(frozen=True)
class PrivacySettings:
    """Client-level DP of a run (``dp_args``; see the README's privacy section).

    clip: ``C``, the L2 bound of a client's whole update. noise_multiplier: ``z``.
    delta: the delta epsilon is reported at. target_epsilon: the whole run's budget (``None``:
    none). sampling: ``fixed`` or ``poisson``. per_round: clients a fixed-size round samples.
    client_rate: ``q`` of Poisson sampling. accountant: ``rdp`` or ``pld``. on_budget: ``refuse``
    a run whose schedule exceeds the target, or ``stop`` training at the round that would.
    noise_seed: the secret seed of the draws (``None``: random per run).
    clip_quantile / clip_lr / count_noise: adaptive clipping's target quantile ``gamma``
    (``None``: a fixed bound), its learning rate ``eta`` and the count's noise ``sigma_b``.
    """

    clip: float
    noise_multiplier: float
    delta: float
    target_epsilon: float | None
    sampling: str
    per_round: int
    client_rate: float
    accountant: str = "rdp"
    on_budget: str = "refuse"
    noise_seed: int | None = None
    clip_quantile: float | None = None
    clip_lr: float = 0.2
    count_noise: float | None = None

    @property
    def update_noise_multiplier(self) -> float:
        """The noise multiplier the update's sum gets: ``z``, or ``z_delta`` beside a noised count."""
        if self.clip_quantile is None:
            return self.noise_multiplier
        return (self.noise_multiplier ** -2 - (2 * self.count_noise) ** -2) ** -0.5

    @classmethod
    def from_config(cls, config: RunConfig) -> "PrivacySettings | None":
        """The run's settings (validated by :class:`RunConfig`), or ``None`` without ``enable_dp``."""
        if not config.enable_dp:
            return None
        p = config.progfed
        rate = p.dp_client_rate if p.dp_client_rate is not None else config.client_num_per_round / config.client_num_in_total
        expected = rate * config.client_num_in_total if p.dp_sampling == "poisson" else config.client_num_per_round
        # Andrew et al.'s suggestion: the count's noise a twentieth of the expected participants
        count_noise = p.dp_count_noise if p.dp_count_noise is not None else expected / 20
        return cls(clip=float(config.clipping_norm), noise_multiplier=float(config.noise_multiplier),
                   delta=float(config.delta), target_epsilon=config.epsilon, sampling=p.dp_sampling,
                   per_round=config.client_num_per_round, client_rate=rate, accountant=p.dp_accountant,
                   on_budget=p.dp_on_budget, noise_seed=p.dp_noise_seed, clip_quantile=p.dp_clip_quantile,
                   clip_lr=p.dp_clip_lr, count_noise=count_noise)

    def event(self, population: int) -> RoundEvent:
        """The round event of ``population`` eligible clients."""
        if self.sampling == "poisson":
            return RoundEvent(population, rate=self.client_rate if population else 0.0)
        return RoundEvent(population, sampled=min(self.per_round, population))

    def expected_participants(self, population: int) -> float:
        """The fixed denominator of a round with ``population`` eligible clients."""
        if self.sampling == "poisson":
            return self.client_rate * population
        return float(min(self.per_round, population))

    def new_accountant(self) -> PrivacyAccountant:
        return PrivacyAccountant(self.noise_multiplier, self.delta, self.sampling, self.accountant)

    def planned_epsilon(self, rounds: int, population: int) -> float:
        """Epsilon of ``rounds`` rounds with ``population`` eligible clients each (before any training)."""
        return self.new_accountant().epsilon({self.event(population): rounds}) if rounds else 0.0

    def largest_rounds(self, population: int, target: float) -> int:
        """The most rounds whose epsilon stays within ``target`` (0 if not even one)."""
        accountant, event = self.new_accountant(), self.event(population)
        low, high = 0, 1
        while accountant.epsilon({event: high}) <= target:
            low, high = high, high * 2
            if high > 10**7:
                return high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if accountant.epsilon({event: middle}) <= target else (low, middle)
        return low

    def smallest_noise(self, rounds: int, population: int, target: float) -> float:
        """The smallest noise multiplier (to 0.01) whose ``rounds`` rounds stay within ``target``."""
        def fits(z: float) -> bool:
            return PrivacyAccountant(z, self.delta, self.sampling, self.accountant).epsilon({self.event(population): rounds}) <= target

        low, high = 0.0, max(self.noise_multiplier, 0.5)
        while not fits(high):
            low, high = high, high * 2
            if high > 1e4:
                return math.inf
        while high - low > 0.005:
            middle = (low + high) / 2
            low, high = (low, middle) if fits(middle) else (middle, high)
        return math.ceil(high * 100) / 100


class ClientLevelDP:
    """The server's DP state and its three acts of a round: sample, noised mean, account.

    Parameters
    ----------
    settings
        The run's :class:`PrivacySettings`.
    """

    def __init__(self, settings: PrivacySettings) -> None:
        self.settings = settings
        self.secret = settings.noise_seed if settings.noise_seed is not None else secrets.randbits(63)
        self.accountant = settings.new_accountant()
        #: the current bound ``C`` (moves each round under adaptive clipping)
        self.clip = settings.clip
        #: round -> its fixed denominator (set when the round's participants are drawn)
        self._denominators: dict[int, float] = {}
        #: the first round that training stopped at because the target would be exceeded
        self.stopped_at: int | None = None

    # ------------------------------------------------------------------ sample

    def participants(self, eligible: Sequence[int], round_idx: int) -> tuple[int, ...]:
        """The clients that train ``round_idx``, drawn from the secret seed; the round is charged here.

        A round that would take epsilon past the target trains nobody (and is not charged).
        """
        settings = self.settings
        eligible = sorted(int(c) for c in eligible)
        event = settings.event(len(eligible))
        target = settings.target_epsilon
        if not eligible or (target is not None and self.accountant.epsilon({event: 1}) > target):
            if eligible and self.stopped_at is None:
                self.stopped_at = round_idx
                log.warning("round %d: one more round would spend epsilon %.3f > the target %g (delta %g); "
                            "training stops here (%s)", round_idx, self.accountant.epsilon({event: 1}), target,
                            settings.delta, f"the model of round {round_idx - 1} is final" if round_idx else "no round trains")
            self._denominators[round_idx] = 0.0
            return ()
        rng = np.random.default_rng(derive_seed("dp-participants", self.secret, round_idx))
        if settings.sampling == "poisson":
            chosen = [c for c, u in zip(eligible, rng.random(len(eligible))) if u < settings.client_rate]
        else:
            count = min(settings.per_round, len(eligible))
            chosen = [int(c) for c in rng.choice(np.asarray(eligible), count, replace=False)]
        self.accountant.record(event)
        self._denominators[round_idx] = settings.expected_participants(len(eligible))
        return tuple(sorted(chosen))

    # ------------------------------------------------------------------ noised mean

    def noised_mean(self, round_idx: int, names: Sequence[str], updates: Sequence[tuple[int, Mapping[str, torch.Tensor]]],
                    shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        """``(sum_i clip(Δ_i) + N(0, (zC)^2 I)) / expected participants`` by name (DP-FedAvg, Alg. 1).

        ``updates`` are ``(client, deltas)``; summed in client order, so every runtime gets the same bits.
        """
        settings = self.settings
        denominator = self._denominators.get(round_idx)
        if not denominator:
            raise ValueError(f"round {round_idx}: no participants were drawn for it, so it has no denominator")
        clip = self.clip
        total = {name: torch.zeros(shapes[name], dtype=torch.float32) for name in names}
        inside = 0
        for _, deltas in sorted(updates, key=lambda u: u[0]):
            clipped, norm = clip_to_norm({n: deltas[n].detach().float().cpu() for n in names}, clip)
            inside += (norm <= clip) - 0.5  # centred bits: one client moves the count by 1/2 (add/remove)
            for name in names:
                total[name] += clipped[name]
        generator = torch.Generator().manual_seed(derive_seed("dp-noise", self.secret, round_idx))
        std = settings.update_noise_multiplier * clip
        mean = {name: (total[name] + std * torch.randn(shapes[name], generator=generator)) / denominator for name in names}
        if settings.clip_quantile is not None:
            # the noised share of updates inside the bound steers it to the target quantile (Andrew et al., Alg. 1)
            count = inside + settings.count_noise * float(torch.randn((), generator=generator))
            share = count / denominator + 0.5
            self.clip = clip * math.exp(-settings.clip_lr * (share - settings.clip_quantile))
        return mean

    def drew(self, round_idx: int) -> bool:
        """Whether ``round_idx`` was charged: its noised mean must be released even if no update arrives
        (an unchanged model would tell that the round was empty)."""
        return bool(self._denominators.get(round_idx))

    # ------------------------------------------------------------------ account

    def epsilon(self) -> float:
        """Epsilon spent so far at the configured delta."""
        return self.accountant.epsilon()

    def summary(self) -> dict[str, Any]:
        """``summary.json``'s ``privacy``: the final (epsilon, delta), the accountant and the mechanism."""
        s = self.settings
        return {
            "epsilon": self.epsilon(), "delta": s.delta, "accountant": self.accountant.describe(),
            "level": "client", "clip": s.clip, "final_clip": self.clip, "clip_quantile": s.clip_quantile, "noise_multiplier": s.noise_multiplier, "sampling": s.sampling,
            "target_epsilon": s.target_epsilon, "rounds_charged": sum(self.accountant.events.values()),
            "stopped_at_round": self.stopped_at,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON state for checkpoints (the secret included: checkpoints stay on the server)."""
        return {"secret": str(self.secret), "events": self.accountant.state_dict(), "stopped_at": self.stopped_at,
                "clip": self.clip,
                "denominators": {str(r): d for r, d in self._denominators.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.secret = int(state["secret"])
        self.accountant.load_state_dict(state["events"])
        self.stopped_at = state.get("stopped_at")
        self.clip = float(state.get("clip", self.settings.clip))
        self._denominators = {int(r): float(d) for r, d in state.get("denominators", {}).items()}
