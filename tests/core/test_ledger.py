"""The ledger on its own: rows, derived cumulative columns and totals, per-client entries, state, fixed columns."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import fields

import pytest

import fedml_progfed.report as report
import fedml_progfed.report.metrics as metrics
from fedml_progfed.core.ledger import METRIC_COLUMNS, Ledger, RoundRecord

DOCUMENTED = ("round", "stage", "active_params", "bytes_down", "bytes_up", "cum_bytes", "client_flops", "cum_flops",
              "train_loss", "test_loss", "test_metric", "wall_s")


def append(ledger: Ledger, round_idx: int, **changes) -> RoundRecord:
    """Append a row with small distinct defaults; ``changes`` override any argument."""
    arguments = dict(round_idx=round_idx, stage=1, active_params=100, bytes_down=10, bytes_up=5, client_flops=1000,
                     train_loss=2.0, wall_s=0.5, warmup=False, lr=0.1, num_clients=2)
    arguments.update(changes)
    return ledger.append(**arguments)


def three_rounds() -> Ledger:
    """Three rounds with different bytes, FLOPs, clients (one dropped), columns and a test on the last."""
    ledger = Ledger()
    append(ledger, 0, bytes_down=10, bytes_up=5, client_flops=100, wall_s=1.0, server_s=0.25, seeded_params=3,
           clients=[{"client": 0, "bytes_down": 5, "bytes_up": 2, "train_flops": 60, "compute_s": 0.5},
                    {"client": 1, "bytes_down": 5, "bytes_up": 3, "train_flops": 40, "compute_s": 0.25}],
           columns={"eval_flops": 7, "dropped_clients": 0})
    append(ledger, 1, stage=2, bytes_down=20, bytes_up=7, client_flops=50, wall_s=2.0, server_s=0.5, warmup=True,
           clients=[{"client": 2, "bytes_down": 20, "bytes_up": 4, "train_flops": 50, "compute_s": 1.5},
                    {"client": 3, "bytes_down": 0, "bytes_up": 3, "dropped": "client 3's update: NaN"}],
           columns={"phase": "grow", "dropped_clients": 1})
    append(ledger, 2, stage=2, bytes_down=0, bytes_up=0, client_flops=0, wall_s=0.125, test_loss=0.75,
           test_metric=0.625, columns={"eval_flops": 9, "dice_wt": 0.5})
    return ledger


def same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN (rows hold NaN for untested rounds)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# ---------------------------------------------------------------------------------------------- rows


def test_cumulative_bytes_and_flops_are_derived_from_the_rows_in_order():
    ledger = three_rounds()
    assert [r["cum_bytes"] for r in ledger.rows] == [15, 42, 42]
    assert [r["cum_flops"] for r in ledger.rows] == [100, 150, 150]
    running_bytes = running_flops = 0
    for row in ledger.rows:
        running_bytes += row["bytes_down"] + row["bytes_up"]
        running_flops += row["client_flops"]
        assert (row["cum_bytes"], row["cum_flops"]) == (running_bytes, running_flops), row["round"]


def test_the_cumulative_columns_cannot_be_passed_in():
    """They are derived, never kept twice: append has no argument for them."""
    with pytest.raises(TypeError):
        append(Ledger(), 0, cum_bytes=123)
    with pytest.raises(TypeError):
        append(Ledger(), 0, cum_flops=123)


@pytest.mark.parametrize("following", [2, 5, 0, -1], ids=["gap", "long gap", "repeat", "backwards"])
def test_a_row_must_follow_the_previous_round(following):
    ledger = Ledger()
    append(ledger, 0)
    with pytest.raises(ValueError, match=f"ledger expected round 1, got {following}"):
        append(ledger, following)
    assert len(ledger.records) == 1 and ledger.rows[0]["round"] == 0  # the refused row was not kept
    append(ledger, 1)  # the right one still goes in
    assert [r["round"] for r in ledger.rows] == [0, 1]


def test_test_columns_are_carried_and_nan_when_the_round_was_not_tested():
    rows = three_rounds().rows
    assert (rows[2]["test_loss"], rows[2]["test_metric"]) == (0.75, 0.625)
    assert all(math.isnan(r["test_loss"]) and math.isnan(r["test_metric"]) for r in rows[:2])
    assert rows[2]["train_loss"] == 2.0 and rows[2]["wall_s"] == 0.125


def test_extra_columns_are_flattened_into_the_row_and_no_nested_field_is_left():
    rows = three_rounds().rows
    assert rows[0]["eval_flops"] == 7 and rows[0]["dropped_clients"] == 0
    assert rows[1]["phase"] == "grow" and rows[1]["dropped_clients"] == 1 and "eval_flops" not in rows[1]
    assert rows[2]["dice_wt"] == 0.5
    assert all("columns" not in r and "clients" not in r for r in rows)
    assert all(isinstance(v, (int, float, str)) for r in rows for v in r.values())  # every cell is a scalar


def test_optional_fields_are_in_the_row():
    rows = three_rounds().rows
    assert [r["warmup"] for r in rows] == [0, 1, 0] and all(type(r["warmup"]) is int for r in rows)
    assert [r["stage"] for r in rows] == [1, 2, 2]
    assert (rows[0]["lr"], rows[0]["num_clients"], rows[0]["server_s"], rows[0]["seeded_params"]) == (0.1, 2, 0.25, 3)


def test_client_compute_seconds_are_summed_per_row_and_a_dropped_client_adds_nothing():
    rows = three_rounds().rows
    assert [r["client_compute_s"] for r in rows] == [0.75, 1.5, 0.0]


def test_rows_are_copies_and_append_copies_what_it_was_given():
    ledger, columns, clients = Ledger(), {"phase": "a"}, [{"client": 0, "compute_s": 1.0}]
    append(ledger, 0, columns=columns, clients=clients)
    columns["phase"] = "changed"
    clients.append({"client": 1, "compute_s": 5.0})
    ledger.rows[0]["bytes_down"] = -1
    row = ledger.rows[0]
    assert (row["phase"], row["client_compute_s"], row["bytes_down"]) == ("a", 1.0, 10)


# ---------------------------------------------------------------------------------------------- totals


def test_totals_are_the_sums_of_the_rows_columns():
    ledger = three_rounds()
    rows, totals = ledger.rows, ledger.totals()
    assert totals == {
        "total_bytes_down": sum(r["bytes_down"] for r in rows),
        "total_bytes_up": sum(r["bytes_up"] for r in rows),
        "total_bytes": sum(r["bytes_down"] + r["bytes_up"] for r in rows),
        "total_flops": sum(r["client_flops"] for r in rows),
        "total_eval_flops": sum(r.get("eval_flops", 0) for r in rows),
        "wall_s": sum(r["wall_s"] for r in rows),
        "server_s": sum(r["server_s"] for r in rows),
        "client_compute_s": sum(r["client_compute_s"] for r in rows),
        "client_messages": sum(len(r.clients) for r in ledger.records),
        "seeded_params": sum(r["seeded_params"] for r in rows),
    }
    # and the literal numbers, so a sum over the wrong column cannot agree with itself
    assert totals == {"total_bytes_down": 30, "total_bytes_up": 12, "total_bytes": 42, "total_flops": 150,
                      "total_eval_flops": 16, "wall_s": 3.125, "server_s": 0.75, "client_compute_s": 2.25,
                      "client_messages": 4, "seeded_params": 3}
    assert totals["total_bytes"] == rows[-1]["cum_bytes"] and totals["total_flops"] == rows[-1]["cum_flops"]


def test_an_empty_ledger_totals_zero():
    ledger = Ledger()
    assert ledger.rows == [] and ledger.per_client() == []
    assert set(ledger.totals().values()) == {0}


def test_per_client_is_one_entry_per_round_and_client_with_the_round_added():
    entries = three_rounds().per_client()
    assert [(e["round"], e["client"]) for e in entries] == [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert entries[0] == {"round": 0, "client": 0, "bytes_down": 5, "bytes_up": 2, "train_flops": 60, "compute_s": 0.5}
    assert entries[3]["dropped"] == "client 3's update: NaN" and "compute_s" not in entries[3]


# ---------------------------------------------------------------------------------------------- state


def test_state_dict_is_json_and_restores_identical_rows_totals_and_per_client_entries():
    ledger = three_rounds()
    text = json.dumps(ledger.state_dict())  # what a checkpoint writes
    restored = Ledger()
    append(restored, 0, bytes_down=999)  # restoring replaces what was there
    restored.load_state_dict(json.loads(text))
    assert len(restored.records) == 3
    assert same(restored.rows, ledger.rows)
    assert restored.totals() == ledger.totals()
    assert restored.per_client() == ledger.per_client()
    assert all(type(a[k]) is type(b[k]) for a, b in zip(restored.rows, ledger.rows) for k in a)  # ints stay ints
    # the restored ledger continues where the saved one stopped, deriving from the restored rows
    with pytest.raises(ValueError, match="expected round 3"):
        append(restored, 0)
    row = append(restored, 3, bytes_down=1, bytes_up=2, client_flops=3)
    assert (row.cum_bytes, row.cum_flops) == (45, 153)


def test_load_state_dict_ignores_keys_it_does_not_know():
    state = three_rounds().state_dict()
    state[0]["from_a_newer_version"] = 1
    restored = Ledger()
    restored.load_state_dict(state)
    assert "from_a_newer_version" not in restored.rows[0] and restored.rows[0]["cum_bytes"] == 15


# ---------------------------------------------------------------------------------------------- the fixed columns


def test_metric_columns_are_the_first_twelve_record_fields_in_the_documented_order():
    assert METRIC_COLUMNS == DOCUMENTED
    assert tuple(f.name for f in fields(RoundRecord))[:12] == DOCUMENTED
    # the table in report.metrics' docstring lists the same names in the same order
    documented = tuple(re.findall(r"^``(\w+)``", metrics.__doc__, flags=re.MULTILINE))
    assert documented == DOCUMENTED


def test_the_report_uses_the_ledgers_tuple_and_writes_it_first(tmp_path):
    assert metrics.METRIC_COLUMNS is METRIC_COLUMNS and report.METRIC_COLUMNS is METRIC_COLUMNS
    rows = three_rounds().rows
    assert tuple(rows[0])[:12] == DOCUMENTED  # a row's own key order starts with the fixed columns
    path = metrics.write_metrics_csv(tmp_path / "metrics.csv", rows)
    with open(path, newline="") as handle:
        header = next(csv.reader(handle))
    assert tuple(header[:12]) == DOCUMENTED
    assert {"client_compute_s", "phase", "dice_wt", "eval_flops"} <= set(header[12:])
