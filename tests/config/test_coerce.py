"""YAML values to the dataclass fields' types: what is accepted, what is refused, and the field named."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from fedml_progfed.config import ProgFedConfig, RunConfig
from fedml_progfed.config.coerce import coerce, coerce_fields
from fedml_progfed.errors import FieldError


@pytest.mark.parametrize(
    "value,annotation,result",
    [
        (12, int, 12),
        ("12", int, 12),
        (12.0, int, 12),
        ("1e3", int, 1000),  # PyYAML reads 1e3 as a string
        (" 7 ", int, 7),
        (0.5, float, 0.5),
        (1, float, 1.0),
        ("1e-3", float, 0.001),
        ("-2.5", float, -2.5),
        (True, bool, True),
        ("yes", bool, True),
        ("No", bool, False),
        (" true ", bool, True),
        ("0", bool, False),
        (1, bool, True),
        (0, bool, False),
        ("sgd", str, "sgd"),
        (5, str, "5"),
        (None, int | None, None),
        ("none", float | None, None),
        ("NULL", str | None, None),
        ("", tuple[int, ...] | None, None),
        ("3", int | None, 3),
        ([25, 25, 50], tuple[int, ...], (25, 25, 50)),
        (("1", 2.0), tuple[int, ...] | None, (1, 2)),
        ("1, 2,3", tuple[int, ...], (1, 2, 3)),  # a --set list written without brackets
        ([], tuple[int, ...], ()),
    ],
)
def test_accepted_values_become_the_fields_type(value, annotation, result):
    out = coerce("f", value, annotation)
    assert out == result and type(out) is type(result)


@pytest.mark.parametrize(
    "value,annotation,problem",
    [
        (None, int, "a value is required"),
        ("", float, "a value is required"),
        ("null", str, "a value is required"),
        (True, int, "True is not an integer"),  # a bool is not silently 1
        (1.5, int, "1.5 is not an integer"),
        ("abc", int, "'abc' is not an integer"),
        (float("inf"), int, "is not an integer"),
        ([1], int, "is not an integer"),
        ("abc", float, "'abc' is not a number"),
        ("nan", float, "'nan' is not a finite number"),
        (float("-inf"), float, "is not a finite number"),
        ({"a": 1}, float, "is not a number"),
        (2, bool, "2 is not true/false"),
        ("maybe", bool, "'maybe' is not true/false"),
        (1.0, bool, "1.0 is not true/false"),
        ([1, 2], str, "is not a single value"),
        ({"a": 1}, str, "is not a single value"),
        (5, tuple[int, ...], "5 is not a list"),
        ([1, "x"], tuple[int, ...], "'x' is not an integer"),
        ([1, None], tuple[int, ...], "a value is required"),
        ("2.5", int | None, "'2.5' is not an integer"),
    ],
)
def test_refused_values_are_one_field_error_naming_the_field(value, annotation, problem):
    with pytest.raises(FieldError) as caught:
        coerce("progfed.schedule", value, annotation)
    assert caught.value.field == "progfed.schedule" and problem in caught.value.problem


def test_coerce_fields_uses_the_dataclass_hints_and_the_prefix():
    @dataclass(frozen=True)
    class Section:
        rounds: int = 1
        rate: float = 0.1
        on: bool = False
        steps: tuple[int, ...] | None = None

    out = coerce_fields(Section, {"rounds": "4", "rate": "1e-2", "on": "yes", "steps": [1, "2"]}, prefix="demo.")
    assert out == {"rounds": 4, "rate": 0.01, "on": True, "steps": (1, 2)}
    assert Section(**out) == Section(4, 0.01, True, (1, 2))
    with pytest.raises(FieldError) as caught:
        coerce_fields(Section, {"rate": "fast"}, prefix="demo.")
    assert caught.value.field == "demo.rate"
    assert coerce_fields(ProgFedConfig, {"stages": "3", "schedule": "null"}) == {"stages": 3, "schedule": None}


def test_from_flat_coerces_fedml_and_our_keys_and_names_the_field():
    config = RunConfig.from_flat({
        "comm_round": "20", "learning_rate": "1e-2", "using_gpu": "false", "patch_size": [64, 64, 64],
        "progfed_stages": "4", "progfed_schedule": "2,4,6,8", "profl_em_threshold": "0.05",
        "enable_wandb": "whatever FedML makes of it",  # FedML's key: left alone
    })
    assert (config.comm_round, config.learning_rate, config.using_gpu) == (20, 0.01, False)
    assert config.patch_size == (64, 64, 64)
    assert config.progfed.stages == 4 and config.progfed.schedule == (2, 4, 6, 8)
    assert math.isclose(config.profl.em_threshold, 0.05)
    with pytest.raises(FieldError) as caught:
        RunConfig.from_flat({"progfed_warmup_rounds": "two"})
    assert caught.value.field == "progfed.warmup_rounds"
    with pytest.raises(FieldError) as caught:
        RunConfig.from_flat({"profl_em_window": 2.5})
    assert caught.value.field == "profl.em_window"
    with pytest.raises(FieldError) as caught:
        RunConfig.from_flat({"epochs": "one"})
    assert caught.value.field == "epochs"


def test_large_integers_are_kept_exactly():
    """A float would round integers above 2**53: seeds 2**53 and 2**53 + 1 would be the same run."""
    assert coerce("random_seed", 2**53 + 1, int) == 2**53 + 1
    assert coerce("random_seed", str(2**53 + 1), int) == 2**53 + 1  # as --set writes it
