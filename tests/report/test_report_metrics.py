"""metrics.csv: fixed column order, NaN cells and a missing column."""

from __future__ import annotations

import csv
import math

import pytest

from fedml_progfed.report import (
    EXTRA_COLUMNS,
    METRIC_COLUMNS,
    read_metrics_csv,
    write_metrics_csv,
)


def _row(r: int, metric: float) -> dict:
    return {
        "round": r,
        "stage": 1 + (r > 2),
        "active_params": 1234,
        "bytes_down": 4936,
        "bytes_up": 4936,
        "cum_bytes": 9872 * r,
        "client_flops": 1.5e9,
        "cum_flops": 1.5e9 * r,
        "train_loss": 0.1 * r,
        "test_loss": float("nan") if math.isnan(metric) else 1.0 / r,
        "test_metric": metric,
        "wall_s": 0.25,
        "warmup": r == 3,
        "lr": 0.05,
        "num_clients": 10,
    }


def test_fixed_columns_are_the_contract() -> None:
    assert METRIC_COLUMNS == (
        "round", "stage", "active_params", "bytes_down", "bytes_up", "cum_bytes",
        "client_flops", "cum_flops", "train_loss", "test_loss", "test_metric", "wall_s",
    )
    assert EXTRA_COLUMNS == ("warmup", "lr", "num_clients")


def test_round_trip_with_nan_cells_and_column_order(tmp_path) -> None:
    rows = [_row(1, float("nan")), _row(2, 0.5), _row(3, float("nan")), _row(4, 0.625)]
    # Keys given in a scrambled order must still come out in the fixed order.
    rows[0] = dict(reversed(list(rows[0].items())))
    path = write_metrics_csv(tmp_path / "run" / "metrics.csv", rows)

    with open(path, newline="") as fh:
        header = next(csv.reader(fh))
    assert header == list(METRIC_COLUMNS) + list(EXTRA_COLUMNS)
    lines = path.read_text().splitlines()
    # NaN is an empty cell, not the text "nan".
    assert "nan" not in path.read_text().lower()
    assert lines[1].split(",")[METRIC_COLUMNS.index("test_metric")] == ""

    back = read_metrics_csv(path)
    assert len(back) == 4
    assert list(back[0]) == header
    for original, parsed in zip(rows, back):
        for key in header:
            want, got = original[key], parsed[key]
            if isinstance(want, float) and math.isnan(want):
                assert isinstance(got, float) and math.isnan(got), key
            else:
                assert got == want, key
    assert isinstance(back[1]["round"], int)
    assert isinstance(back[1]["cum_bytes"], int)
    assert isinstance(back[1]["client_flops"], float)
    assert back[2]["warmup"] == 1 and back[1]["warmup"] == 0


def test_unknown_keys_are_kept_after_extras(tmp_path) -> None:
    row = _row(1, 0.5)
    row["note"] = "x"
    del row["lr"]
    path = write_metrics_csv(tmp_path / "metrics.csv", [row])
    back = read_metrics_csv(path)
    assert list(back[0])[-3:] == ["warmup", "num_clients", "note"]
    assert back[0]["note"] == "x"


def test_missing_fixed_column_raises_naming_it(tmp_path) -> None:
    rows = [_row(1, 0.5), _row(2, 0.6)]
    del rows[1]["cum_flops"]
    with pytest.raises(ValueError, match=r"round 2.*'cum_flops'"):
        write_metrics_csv(tmp_path / "metrics.csv", rows)
    assert not (tmp_path / "metrics.csv").exists()


def test_reader_rejects_file_without_fixed_columns(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("round,stage\n1,1\n")
    with pytest.raises(ValueError, match="active_params"):
        read_metrics_csv(path)
