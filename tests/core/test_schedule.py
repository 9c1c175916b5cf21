"""Schedule against ProgFed's guideline (Sec. 3.1) and its error messages."""

import math

import pytest

from fedml_progfed.core.schedule import Schedule, guideline_rounds
from fedml_progfed.config import explain
from fedml_progfed.errors import FieldError


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


def stages(schedule):
    return [schedule.at(r).stage for r in range(schedule.total_rounds)]


def warmups(schedule):
    return [schedule.at(r).warmup for r in range(schedule.total_rounds)]


def test_stage_per_round_follows_algorithm_1():
    schedule = Schedule.progressive(2000, 4)
    assert [schedule.at(r).stage for r in (0, 249, 250, 499, 500, 749, 750, 1999)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [r for r in range(2000) if schedule.at(r).growth] == [250, 500, 750]


def test_warmup_within_stays_inside_each_stage_budget():
    schedule = Schedule.progressive(10, 3, [2, 3, 5], warmup_rounds=2)
    assert schedule.total_rounds == 10
    assert stages(schedule) == [1, 1, 2, 2, 2, 3, 3, 3, 3, 3]
    assert warmups(schedule) == [False, False, True, True, False, True, True, False, False, False]


def test_warmup_extra_adds_rounds_outside_T_at_the_base_rate_with_the_decay_paused():
    schedule = Schedule.progressive(10, 3, [2, 3, 5], warmup_rounds=2, warmup_mode="extra", lr=0.1, lr_schedule="cosine")
    assert schedule.total_rounds == 14 and schedule.training_rounds == 10
    assert stages(schedule) == [1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3]
    assert warmups(schedule) == [False, False, True, True, False, False, False, True, True] + [False] * 5
    assert [r for r in range(14) if schedule.at(r).growth] == [2, 7]
    lrs = [schedule.at(r).lr for r in range(14)]
    assert lrs[2] == lrs[3] == lrs[7] == lrs[8] == 0.1  # warm-up: base rate
    # ordinary rounds decay as the ten rounds of T: the extra rounds do not advance the cosine
    ordinary = [lr for lr, warm in zip(lrs, warmups(schedule)) if not warm]
    assert ordinary == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 10)) for t in range(10)])


def test_extra_warmup_needs_no_room_in_short_stages():
    schedule = Schedule.progressive(4, 4, warmup_rounds=3, warmup_mode="extra")
    assert schedule.total_rounds == 13 and warmups(schedule).count(True) == 9


def test_end_to_end_is_one_stage_at_full_depth():
    schedule = Schedule.end_to_end(50, 4)
    assert set(stages(schedule)) == {4}
    assert not any(schedule.at(r).growth or schedule.at(r).warmup for r in range(50))


def test_cosine_decay_and_restart():
    schedule = Schedule.progressive(100, 4, lr=0.1, lr_schedule="cosine")
    assert schedule.at(0).lr == pytest.approx(0.1)
    assert schedule.at(50).lr == pytest.approx(0.05)
    assert schedule.at(99).lr == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.99)))
    restart = Schedule.progressive(100, 4, lr=0.1, lr_schedule="cosine", lr_restart_at_growth=True)
    assert restart.at(12).lr == pytest.approx(0.1)  # first round of stage 2
    assert restart.at(11).lr < 0.1
    assert Schedule.progressive(100, 4, lr=0.1).at(77).lr == 0.1


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(total_rounds=10, num_stages=3, stage_rounds=[2, 3, 9]), "progfed_args.progfed_schedule: [2, 3, 9] sums to 14"),
        (dict(total_rounds=10, num_stages=3, stage_rounds=[5, 5]), "progfed_args.progfed_schedule: 2 entries for 3 stages"),
        (dict(total_rounds=10, num_stages=3, stage_rounds=[0, 5, 5]), "progfed_args.progfed_schedule: [0, 5, 5] must be positive"),
        (dict(total_rounds=3, num_stages=4), "train_args.comm_round: 3 rounds are too few"),
        (dict(total_rounds=40, num_stages=4, warmup_rounds=5), "progfed_args.progfed_warmup_rounds: 5 warm-up"),
        (dict(total_rounds=40, num_stages=4, lr_schedule="step"), "progfed_args.progfed_lr_schedule: unknown 'step'"),
    ],
)
def test_bad_schedules_name_the_key(kwargs, key):
    with pytest.raises(FieldError) as err:
        Schedule.progressive(**kwargs)
    assert explain(err.value).startswith(key)
