"""Schedule against ProgFed's guideline (Sec. 3.1) and its error messages."""

import math

import pytest

from fedml_progfed.core.schedule import Schedule, guideline_rounds
from fedml_progfed.errors import ConfigError


@pytest.mark.parametrize("total,stages", [(2000, 4), (1500, 3), (100, 4), (3000, 4), (37, 3)])
def test_guideline_matches_paper_formula(total, stages):
    rounds = guideline_rounds(total, stages)
    assert rounds[:-1] == [total // (2 * stages)] * (stages - 1)
    assert rounds[-1] == total - (stages - 1) * (total // (2 * stages))
    assert sum(rounds) == total
    # the paper's T_S = T(S+1)/(2S) whenever T/(2S) is an integer
    if total % (2 * stages) == 0:
        assert rounds[-1] == total * (stages + 1) // (2 * stages)


def test_short_runs_visit_every_stage_once():
    assert guideline_rounds(4, 4) == [1, 1, 1, 1]
    assert guideline_rounds(6, 4) == [1, 1, 1, 3]


def test_stage_per_round_follows_algorithm_1():
    schedule = Schedule.progressive(2000, 4)
    assert [schedule.stage(r) for r in (0, 249, 250, 499, 500, 749, 750, 1999)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert schedule.growth_rounds == [250, 500, 750]
    assert schedule.is_growth_round(250) and not schedule.is_growth_round(251) and not schedule.is_growth_round(0)


def test_explicit_schedule_and_warmup():
    schedule = Schedule.progressive(10, 3, [2, 3, 5], warmup_rounds=2)
    assert [schedule.stage(r) for r in range(10)] == [1, 1, 2, 2, 2, 3, 3, 3, 3, 3]
    assert [schedule.is_warmup(r) for r in range(10)] == [False, False, True, True, False, True, True, False, False, False]


def test_end_to_end_is_one_stage_at_full_depth():
    schedule = Schedule.end_to_end(50, 4)
    assert {schedule.stage(r) for r in range(50)} == {4}
    assert schedule.growth_rounds == [] and not any(schedule.is_warmup(r) for r in range(50))


def test_cosine_decay_and_restart():
    schedule = Schedule.progressive(100, 4, lr=0.1, lr_schedule="cosine")
    assert schedule.lr(0) == pytest.approx(0.1)
    assert schedule.lr(50) == pytest.approx(0.05)
    assert schedule.lr(99) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.99)))
    restart = Schedule.progressive(100, 4, lr=0.1, lr_schedule="cosine", lr_restart_at_growth=True)
    assert restart.lr(12) == pytest.approx(0.1)  # first round of stage 2
    assert restart.lr(11) < 0.1
    assert Schedule.progressive(100, 4, lr=0.1).lr(77) == 0.1


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(total_rounds=10, num_stages=3, stage_rounds=[2, 3, 9]), "progfed_schedule"),
        (dict(total_rounds=10, num_stages=3, stage_rounds=[5, 5]), "progfed_schedule"),
        (dict(total_rounds=10, num_stages=3, stage_rounds=[0, 5, 5]), "progfed_schedule"),
        (dict(total_rounds=3, num_stages=4), "comm_round"),
        (dict(total_rounds=40, num_stages=4, warmup_rounds=5), "progfed_warmup_rounds"),
        (dict(total_rounds=40, num_stages=4, lr_schedule="step"), "progfed_lr_schedule"),
    ],
)
def test_bad_schedules_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        Schedule.progressive(**kwargs)
