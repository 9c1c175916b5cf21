"""The one object that answers "which stage, warm-up or not, what learning rate" for a round.

ProgFed Sec. 3.1 ("Training of Progressive Models") and Alg. 1: stage ``s`` is
trained for ``T_s`` rounds; the practical guideline is ``T_s = T / (2S)`` for
``s < S`` and the last stage takes the rest. Sec. 4.1: warm-up after growth and
learning-rate restarts; the authors decay the client learning rate with a cosine.
Rounds are numbered from 0, as in FedML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from fedml_progfed.errors import ConfigError, FieldError


@dataclass(frozen=True)
class Phase:
    """A run of consecutive rounds that train the same sub-model."""

    stage: int
    start: int
    rounds: int

    @property
    def end(self) -> int:
        return self.start + self.rounds


def guideline_rounds(total_rounds: int, num_stages: int) -> list[int]:
    """Per-stage round budgets of the paper's guideline: ``T/(2S)`` each, the last stage the rest.

    ``T/(2S)`` is rounded down but to at least one round, so short runs (``S <= T < 2S``)
    still visit every stage once.
    """
    if total_rounds < num_stages:
        raise ConfigError(
            f"train_args.comm_round: {total_rounds} rounds are too few for {num_stages} stages (one round per "
            f"stage at least); use at least {num_stages} rounds or fewer progfed_args.progfed_stages"
        )
    per_stage = max(1, total_rounds // (2 * num_stages))
    early = [per_stage] * (num_stages - 1)
    return [*early, total_rounds - sum(early)]


def _constant(lr: float, lr_min: float, progress: float) -> float:
    return lr


def _cosine(lr: float, lr_min: float, progress: float) -> float:
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))


LR_SCHEDULES: dict[str, Callable[[float, float, float], float]] = {"constant": _constant, "cosine": _cosine}


class Schedule:
    """Stages, warm-up rounds and client learning rates for every round of a run.

    Parameters
    ----------
    phases
        Consecutive phases covering rounds ``0..T-1``; stages must increase.
    warmup_rounds
        Rounds after each growth during which only the entering block and head train.
    lr, lr_min
        Client learning rate and the floor of its decay.
    lr_schedule
        ``constant`` or ``cosine`` (decay over all rounds, or over each stage when
        ``lr_restart_at_growth``).
    """

    def __init__(
        self,
        phases: Sequence[Phase],
        warmup_rounds: int = 0,
        lr: float = 0.1,
        lr_schedule: str = "constant",
        lr_min: float = 0.0,
        lr_restart_at_growth: bool = False,
    ) -> None:
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"progfed_args.progfed_lr_schedule: unknown {lr_schedule!r}; available: {', '.join(LR_SCHEDULES)}"
            )
        self.phases = tuple(phases)
        self.warmup_rounds = warmup_rounds
        self.base_lr = lr
        self.lr_min = lr_min
        self.lr_schedule = lr_schedule
        self.lr_restart_at_growth = lr_restart_at_growth
        for earlier, later in zip(self.phases, self.phases[1:]):
            if later.start != earlier.end or later.stage <= earlier.stage:
                raise ConfigError("schedule phases must be consecutive with increasing stages")
        growing = self.phases[1:]
        if growing and warmup_rounds >= min(p.rounds for p in growing):
            raise ConfigError(
                f"progfed_args.progfed_warmup_rounds: {warmup_rounds} warm-up rounds leave no ordinary round in a "
                f"stage of {min(p.rounds for p in growing)} rounds; use fewer warm-up rounds"
            )

    @classmethod
    def progressive(
        cls, total_rounds: int, num_stages: int, stage_rounds: Sequence[int] | None = None, **kwargs
    ) -> "Schedule":
        """ProgFed's schedule: stages ``1..S`` with explicit budgets or the paper's guideline."""
        rounds = list(stage_rounds) if stage_rounds else guideline_rounds(total_rounds, num_stages)
        if len(rounds) != num_stages:
            raise ConfigError(
                f"progfed_args.progfed_schedule: {len(rounds)} entries for {num_stages} stages; give one round "
                f"count per stage"
            )
        if any((not isinstance(r, int)) or r < 1 for r in rounds):
            raise ConfigError(f"progfed_args.progfed_schedule: {rounds} must be positive integers")
        if sum(rounds) != total_rounds:
            raise ConfigError(
                f"progfed_args.progfed_schedule: {rounds} sums to {sum(rounds)} rounds but "
                f"train_args.comm_round is {total_rounds}; make them equal"
            )
        phases, start = [], 0
        for stage, count in enumerate(rounds, start=1):
            phases.append(Phase(stage=stage, start=start, rounds=count))
            start += count
        return cls(phases, **kwargs)

    @classmethod
    def end_to_end(cls, total_rounds: int, num_stages: int, **kwargs) -> "Schedule":
        """The baseline: the full model ``M^S`` for every round (same code, a single stage)."""
        kwargs["warmup_rounds"] = 0
        return cls([Phase(stage=num_stages, start=0, rounds=total_rounds)], **kwargs)

    @property
    def total_rounds(self) -> int:
        return self.phases[-1].end

    def phase(self, round_idx: int) -> Phase:
        if not 0 <= round_idx < self.total_rounds:
            raise ValueError(f"round {round_idx} outside 0..{self.total_rounds - 1}")
        for phase in self.phases:
            if round_idx < phase.end:
                return phase
        raise AssertionError("unreachable")

    def stage(self, round_idx: int) -> int:
        return self.phase(round_idx).stage

    def is_growth_round(self, round_idx: int) -> bool:
        """True on the first round of every phase but the first."""
        phase = self.phase(round_idx)
        return phase is not self.phases[0] and round_idx == phase.start

    def is_warmup(self, round_idx: int) -> bool:
        phase = self.phase(round_idx)
        return phase is not self.phases[0] and round_idx < phase.start + self.warmup_rounds

    def lr(self, round_idx: int) -> float:
        if self.lr_restart_at_growth:
            phase = self.phase(round_idx)
            progress = (round_idx - phase.start) / phase.rounds
        else:
            progress = round_idx / self.total_rounds
        return LR_SCHEDULES[self.lr_schedule](self.base_lr, self.lr_min, progress)

    @property
    def growth_rounds(self) -> list[int]:
        return [phase.start for phase in self.phases[1:]]

    def describe(self) -> list[dict]:
        """One dict per phase (stage, first round, rounds), for logs and ``describe``."""
        return [{"stage": p.stage, "start": p.start, "rounds": p.rounds} for p in self.phases]


def schedule_for(config, num_stages: int) -> Schedule:
    """The run's schedule for a model with ``num_stages`` stages (``config`` is a RunConfig)."""
    p = config.progfed
    lr = dict(lr=config.learning_rate, lr_schedule=p.lr_schedule, lr_min=p.lr_min, lr_restart_at_growth=p.lr_restart_at_growth)
    if p.strategy == "e2e":
        return Schedule.end_to_end(config.comm_round, num_stages, **lr)
    if p.strategy != "progfed":
        raise FieldError("progfed.strategy", f"unknown {p.strategy!r}; use progfed | e2e")
    return Schedule.progressive(config.comm_round, num_stages, p.schedule, warmup_rounds=p.warmup_rounds, **lr)
