"""Which stage, warm-up or not, and what learning rate, for every round of a ProgFed run.

ProgFed Sec. 3.1 ("Training of Progressive Models") and Alg. 1: stage ``s`` is
trained for ``T_s`` rounds; the practical guideline is ``T_s = T / (2S)`` for
``s < S`` and the last stage takes the rest. Sec. 4.1: after each growth a
few warm-up rounds train only the entering block and head, and the client
learning rate decays with a cosine (optionally restarted at every growth).

Warm-up has two modes:

``within``
    The warm-up rounds are the first rounds of the stage's ``T_s`` (the run
    has ``T`` rounds); the learning rate follows the schedule through them.
``extra``
    What the authors' code does: ``W`` extra rounds after each growth, outside
    ``T`` (the run has ``T + (S-1) W`` rounds), at the base learning rate with
    the decay paused; ordinary rounds decay as if the warm-up did not exist.

Rounds are numbered from 0, as in FedML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from fedml_progfed.core.registry import Registry
from fedml_progfed.errors import FieldError


@dataclass(frozen=True)
class Phase:
    """Consecutive rounds training one stage: ``warmup`` warm-up rounds, then ordinary ones.

    Attributes
    ----------
    stage
        The stage ``s`` trained.
    start
        First round of the phase.
    rounds
        Rounds of the phase, warm-up included.
    warmup
        Warm-up rounds at the start of the phase (0 for the first stage).
    extra
        Whether the warm-up rounds are extra rounds outside ``T`` (``warmup_mode: extra``).
    """

    stage: int
    start: int
    rounds: int
    warmup: int = 0
    extra: bool = False

    @property
    def end(self) -> int:
        return self.start + self.rounds

    @property
    def training_rounds(self) -> int:
        """Rounds that count towards ``T`` (and towards the learning-rate decay)."""
        return self.rounds - self.warmup if self.extra else self.rounds


def guideline_rounds(total_rounds: int, num_stages: int) -> list[int]:
    """Per-stage round budgets of the paper's guideline: ``T/(2S)`` each, the last stage the rest.

    ``T/(2S)`` is rounded down but to at least one round, so short runs (``S <= T < 2S``)
    still visit every stage once.
    """
    if total_rounds < num_stages:
        raise FieldError(
            "comm_round",
            f"{total_rounds} rounds are too few for {num_stages} stages (one round per stage at least); "
            f"use at least {num_stages} rounds or fewer progfed stages",
        )
    per_stage = max(1, total_rounds // (2 * num_stages))
    early = [per_stage] * (num_stages - 1)
    return [*early, total_rounds - sum(early)]


def _constant(lr: float, lr_min: float, progress: float) -> float:
    return lr


def _cosine(lr: float, lr_min: float, progress: float) -> float:
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))


LR_SCHEDULES: Registry[Callable[[float, float, float], float]] = Registry("learning-rate schedule")
LR_SCHEDULES.add("constant", _constant)
LR_SCHEDULES.add("cosine", _cosine)


@dataclass(frozen=True)
class RoundSpec:
    """What the schedule says about one round."""

    stage: int
    warmup: bool
    lr: float
    growth: bool  # first round of a stage after the first


class Schedule:
    """Stages, warm-up rounds and client learning rates for every round of a run.

    Parameters
    ----------
    phases
        Consecutive phases covering rounds ``0..total-1``; stages must increase.
    lr, lr_min
        Client learning rate and the floor of its decay.
    lr_schedule
        ``constant`` or ``cosine`` (over the ``T`` training rounds, or over each
        stage's rounds when ``lr_restart_at_growth``).
    """

    def __init__(
        self,
        phases: Sequence[Phase],
        lr: float = 0.1,
        lr_schedule: str = "constant",
        lr_min: float = 0.0,
        lr_restart_at_growth: bool = False,
    ) -> None:
        self._decay = LR_SCHEDULES.lookup(lr_schedule, "progfed.lr_schedule")
        self.phases = tuple(phases)
        self.base_lr = lr
        self.lr_min = lr_min
        self.lr_schedule = lr_schedule
        self.lr_restart_at_growth = lr_restart_at_growth
        for earlier, later in zip(self.phases, self.phases[1:]):
            if later.start != earlier.end or later.stage <= earlier.stage:
                raise ValueError("schedule phases must be consecutive with increasing stages")
        self.training_rounds = sum(p.training_rounds for p in self.phases)

    @classmethod
    def progressive(
        cls,
        total_rounds: int,
        num_stages: int,
        stage_rounds: Sequence[int] | None = None,
        warmup_rounds: int = 0,
        warmup_mode: str = "within",
        **lr_options,
    ) -> "Schedule":
        """ProgFed's schedule: stages ``1..S`` with explicit budgets or the paper's guideline."""
        rounds = list(stage_rounds) if stage_rounds else guideline_rounds(total_rounds, num_stages)
        if len(rounds) != num_stages:
            raise FieldError("progfed.schedule", f"{len(rounds)} entries for {num_stages} stages; give one round count per stage")
        if any((not isinstance(r, int)) or r < 1 for r in rounds):
            raise FieldError("progfed.schedule", f"{rounds} must be positive integers")
        if sum(rounds) != total_rounds:
            raise FieldError(
                "progfed.schedule",
                f"{rounds} sums to {sum(rounds)} rounds but {{comm_round}} is {total_rounds}; make them equal",
            )
        extra = warmup_mode == "extra"
        if not extra and warmup_rounds and num_stages > 1 and warmup_rounds >= min(rounds[1:]):
            raise FieldError(
                "progfed.warmup_rounds",
                f"{warmup_rounds} warm-up rounds leave no ordinary round in a stage of {min(rounds[1:])} rounds; "
                f"use fewer warm-up rounds or {{progfed.warmup_mode}}: extra",
            )
        phases, start = [], 0
        for stage, count in enumerate(rounds, start=1):
            warmup = warmup_rounds if stage > 1 else 0
            length = count + warmup if extra else count
            phases.append(Phase(stage=stage, start=start, rounds=length, warmup=warmup, extra=extra))
            start += length
        return cls(phases, **lr_options)

    @classmethod
    def end_to_end(cls, total_rounds: int, num_stages: int, **lr_options) -> "Schedule":
        """The baseline: the full model ``M^S`` for every round (same code, a single stage)."""
        return cls([Phase(stage=num_stages, start=0, rounds=total_rounds)], **lr_options)

    @property
    def total_rounds(self) -> int:
        """Rounds the run executes (``T``, plus the extra warm-up rounds in ``extra`` mode)."""
        return self.phases[-1].end

    def phase(self, round_idx: int) -> Phase:
        if not 0 <= round_idx < self.total_rounds:
            raise ValueError(f"round {round_idx} outside 0..{self.total_rounds - 1}")
        return next(phase for phase in self.phases if round_idx < phase.end)

    def at(self, round_idx: int) -> RoundSpec:
        """Stage, warm-up flag, learning rate and growth flag of ``round_idx``."""
        phase = self.phase(round_idx)
        offset = round_idx - phase.start
        warmup = offset < phase.warmup
        return RoundSpec(
            stage=phase.stage,
            warmup=warmup,
            lr=self._lr(phase, offset, warmup),
            growth=phase is not self.phases[0] and offset == 0,
        )

    def _lr(self, phase: Phase, offset: int, warmup: bool) -> float:
        if warmup and phase.extra:
            return self.base_lr  # the authors' warm-up: base rate, decay paused
        skipped = phase.warmup if phase.extra else 0  # extra warm-up rounds do not advance the decay
        if self.lr_restart_at_growth:
            progress = (offset - skipped) / phase.training_rounds
        else:
            before = sum(p.training_rounds for p in self.phases if p.end <= phase.start)
            progress = (before + offset - skipped) / self.training_rounds
        return self._decay(self.base_lr, self.lr_min, progress)

    def describe(self) -> list[dict]:
        """One dict per phase (stage, first round, rounds, warm-up rounds), for logs and ``describe``."""
        return [{"stage": p.stage, "start": p.start, "rounds": p.rounds, "warmup": p.warmup} for p in self.phases]
