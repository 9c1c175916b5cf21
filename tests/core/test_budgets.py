"""Per-client memory budgets: every spec form, malformed specs, seeded draws, CSV tables, sampling.

Only :mod:`fedml_progfed.core.budgets` is exercised; which YAML key carries the
spec is the config layer's business and is not asserted here.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedml_progfed.core.budgets import (
    MB,
    BudgetSpec,
    client_budgets,
    eligible_clients,
    parse_budgets,
    sample_participants,
)
from fedml_progfed.errors import FieldError

FULL = 840 * MB  # a full model's measured peak (the authors' release: 840 against budgets in [100, 900])


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text,spec",
    [
        ("relative-uniform:0.12:1.07", BudgetSpec("relative-uniform", 0.12, 1.07)),
        ("uniform-mb:100:900", BudgetSpec("uniform-mb", 100.0, 900.0)),
        ("uniform-mb:1e2:9E2", BudgetSpec("uniform-mb", 100.0, 900.0)),
        ("relative-uniform:0.5:0.5", BudgetSpec("relative-uniform", 0.5, 0.5)),  # LOW == HIGH: every client alike
        ("  relative-uniform:.25:+1.0  ", BudgetSpec("relative-uniform", 0.25, 1.0)),
        ("budgets/clients.csv", BudgetSpec("csv", path="budgets/clients.csv")),
        (" /tmp/b.csv ", BudgetSpec("csv", path="/tmp/b.csv")),
    ],
)
def test_every_spec_form_parses(text, spec):
    parsed = parse_budgets(text)
    assert parsed == spec
    assert parsed.relative == (spec.kind == "relative-uniform")


@pytest.mark.parametrize(
    "text,problem",
    [
        ("relative-uniform:0:1", "0 < LOW <= HIGH"),  # a zero budget fits nothing
        ("uniform-mb:-5:10", "0 < LOW <= HIGH"),
        ("uniform-mb:900:100", "0 < LOW <= HIGH"),  # swapped bounds
        ("uniform-mb:1e999:1e999", "0 < LOW <= HIGH"),  # overflows to inf
        ("relative-uniform:1..2:3", "must be numbers"),
        ("uniform-mb:1-2:3", "must be numbers"),
        ("relative-uniform:0.1", "not a budget spec"),  # HIGH missing
        ("relative-uniform:0.1:0.5:0.9", "not a budget spec"),
        ("uniform-gb:1:2", "not a budget spec"),
        ("relative-uniform:a:b", "not a budget spec"),
        ("relative-uniform:nan:1", "not a budget spec"),
        ("budgets.txt", "not a budget spec"),
        ("", "not a budget spec"),
    ],
)
def test_malformed_specs_are_one_field_error_naming_the_forms(text, problem):
    with pytest.raises(FieldError) as caught:
        parse_budgets(text)
    message = caught.value.problem
    assert problem in message and repr(text) in message
    assert "relative-uniform:LOW:HIGH" in message and "uniform-mb:LOW:HIGH" in message and ".csv" in message


# --------------------------------------------------------------------------- drawn budgets


def test_relative_budgets_are_fractions_of_the_full_model_and_seeded():
    spec = parse_budgets("relative-uniform:0.12:1.07")
    budgets = client_budgets(spec, 200, seed=3, full_model_bytes=FULL)
    assert len(budgets) == 200 and all(isinstance(b, int) for b in budgets)
    assert all(0.12 * FULL - 1 <= b <= 1.07 * FULL + 1 for b in budgets)
    # uniform over the range: both ends are reached and the mean sits in the middle
    assert min(budgets) < 0.2 * FULL and max(budgets) > 1.0 * FULL
    assert np.mean(budgets) == pytest.approx((0.12 + 1.07) / 2 * FULL, rel=0.08)
    assert client_budgets(spec, 200, seed=3, full_model_bytes=FULL) == budgets  # same seed, same budgets
    assert client_budgets(spec, 200, seed=4, full_model_bytes=FULL) != budgets
    # the unit is the full model: twice the model, twice every budget (same draws)
    doubled = client_budgets(spec, 200, seed=3, full_model_bytes=2 * FULL)
    assert all(abs(d - 2 * b) <= 1 for d, b in zip(doubled, budgets))


def test_megabyte_budgets_ignore_the_model_size():
    spec = parse_budgets("uniform-mb:100:900")
    budgets = client_budgets(spec, 50, seed=0, full_model_bytes=FULL)
    assert all(100 * MB <= b <= 900 * MB for b in budgets)
    assert client_budgets(spec, 50, seed=0, full_model_bytes=1) == budgets
    fixed = client_budgets(parse_budgets("uniform-mb:250:250"), 5, seed=0, full_model_bytes=FULL)
    assert fixed == [250_000_000] * 5  # 1 MB is 10^6 bytes


def test_the_draw_does_not_depend_on_the_global_numpy_rng():
    spec = parse_budgets("uniform-mb:100:900")
    np.random.seed(1)
    first = client_budgets(spec, 10, seed=7, full_model_bytes=FULL)
    np.random.seed(2)
    np.random.rand(5)
    assert client_budgets(spec, 10, seed=7, full_model_bytes=FULL) == first


# --------------------------------------------------------------------------- CSV tables


def write(path, text):
    path.write_text(text)
    return parse_budgets(str(path))


def test_csv_budgets_are_read_per_client_in_megabytes(tmp_path):
    spec = write(tmp_path / "b.csv", "client,mb\n2,300\n0,100.5\n1,2e3\n")
    assert client_budgets(spec, 3, seed=0, full_model_bytes=FULL) == [100_500_000, 2_000_000_000, 300_000_000]
    # the table, not the seed or the model, decides
    assert client_budgets(spec, 3, seed=9, full_model_bytes=1) == [100_500_000, 2_000_000_000, 300_000_000]


@pytest.mark.parametrize(
    "table,problem",
    [
        ("client,mb\n0,100\n", "no budget for clients [1, 2]"),
        ("client,mb\n0,100\n1,100\n3,100\n", "client 3 must be in 0..2"),
        ("client,mb\n0,100\n1,0\n2,100\n", ":3: client 1 must be in 0..2 with a positive budget"),
        ("client,mb\n0,100\n1,-4\n2,100\n", "positive budget"),
        ("client,mb\n0,100\n1,nan\n2,100\n", "positive budget"),
        ("client,mb\n0,100\n1,lots\n2,100\n", ":3: expected columns client,mb"),
        ("id,megabytes\n0,100\n1,100\n2,100\n", ":2: expected columns client,mb"),
        ("client,mb\n0,100\n1\n2,100\n", ":3: expected columns client,mb"),  # a short row
    ],
)
def test_bad_csv_tables_name_the_line(tmp_path, table, problem):
    spec = write(tmp_path / "b.csv", table)
    with pytest.raises(FieldError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        client_budgets(spec, 3, seed=0, full_model_bytes=FULL)


def test_a_missing_csv_says_what_to_write(tmp_path):
    spec = parse_budgets(str(tmp_path / "none.csv"))
    with pytest.raises(FieldError, match="does not exist; write a CSV with columns client,mb"):
        client_budgets(spec, 3, seed=0, full_model_bytes=FULL)


# --------------------------------------------------------------------------- eligibility and sampling


def test_eligible_clients_are_those_whose_budget_fits():
    budgets = [100, 50, 300, 99, 100]
    assert eligible_clients(budgets, 100) == [0, 2, 4]  # a budget equal to the need fits
    assert eligible_clients(budgets, 0) == [0, 1, 2, 3, 4]
    assert eligible_clients(budgets, 301) == []


def test_sampling_takes_everyone_when_few_fit():
    assert sample_participants([7, 2, 5], 3, seed=0, round_idx=4) == (7, 2, 5)
    assert sample_participants([7, 2], 5, seed=0, round_idx=4) == (7, 2)
    assert sample_participants([], 5, seed=0, round_idx=4) == ()


def test_sampling_draws_distinct_eligible_clients_seeded_by_run_and_round():
    eligible = list(range(3, 40, 2))  # 19 eligible clients, odd ids only
    draws = {r: sample_participants(eligible, 5, seed=11, round_idx=r) for r in range(20)}
    for chosen in draws.values():
        assert len(chosen) == 5 and len(set(chosen)) == 5
        assert set(chosen) <= set(eligible) and list(chosen) == sorted(chosen)
        assert all(isinstance(c, int) for c in chosen)
    assert len(set(draws.values())) > 15  # rounds draw different sets
    assert all(sample_participants(eligible, 5, seed=11, round_idx=r) == d for r, d in draws.items())
    assert [sample_participants(eligible, 5, seed=12, round_idx=r) for r in range(20)] != list(draws.values())
    # over many rounds every eligible client is chosen about equally often (no bias to the front)
    counts = np.bincount([c for r in range(400) for c in sample_participants(eligible, 5, 11, r)], minlength=40)
    assert counts[eligible].min() > 0.5 * 400 * 5 / 19 and counts.sum() == 400 * 5
    assert counts[[c for c in range(40) if c not in eligible]].sum() == 0
