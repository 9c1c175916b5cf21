"""summarize / write_summary_json on a hand-made six-round run."""

from __future__ import annotations

import json
import math

from fedml_progfed.report import stage_boundaries, summarize, write_summary_json

NAN = float("nan")


def _six_rounds() -> list[dict]:
    stages = [1, 1, 2, 2, 3, 3]
    down = [100, 100, 200, 200, 300, 300]
    up = [50, 50, 100, 100, 150, 150]
    flops = [10, 10, 20, 20, 30, 30]
    metric = [NAN, 0.5, NAN, 0.8, 0.8, 0.75]
    test_loss = [NAN, 1.2, NAN, 0.6, 0.55, 0.7]
    rows, cum_b, cum_f = [], 0, 0
    for i in range(6):
        cum_b += down[i] + up[i]
        cum_f += flops[i]
        rows.append(
            {
                "round": i + 1, "stage": stages[i], "active_params": 10 * stages[i],
                "bytes_down": down[i], "bytes_up": up[i], "cum_bytes": cum_b,
                "client_flops": flops[i], "cum_flops": cum_f,
                "train_loss": 1.0 / (i + 1), "test_loss": test_loss[i],
                "test_metric": metric[i], "wall_s": 0.5,
            }
        )
    return rows


def test_summarize_totals_boundaries_and_best() -> None:
    s = summarize(_six_rounds(), extra={"method": "progfed", "rounds_planned": 6})
    assert s["total_bytes_down"] == 1200
    assert s["total_bytes_up"] == 600
    assert s["total_bytes"] == 1800
    assert s["total_flops"] == 120
    assert s["rounds"] == 6 and s["last_round"] == 6
    assert s["stage_boundaries"] == [3, 5]
    assert s["num_stages"] == 3
    # 0.8 is first reached in round 4; round 5 ties and must not win.
    assert s["best_metric"] == 0.8 and s["best_round"] == 4
    assert s["final_metric"] == 0.75 and s["final_metric_round"] == 6
    assert s["final_test_loss"] == 0.7
    assert s["wall_s"] == 3.0
    assert s["method"] == "progfed"


def test_final_values_skip_untested_last_round() -> None:
    rows = _six_rounds()
    rows[-1]["test_metric"] = NAN
    rows[-1]["test_loss"] = NAN
    s = summarize(rows)
    assert s["final_metric"] == 0.8 and s["final_metric_round"] == 5
    assert s["final_test_loss"] == 0.55


def test_no_stage_change_and_no_tests() -> None:
    rows = _six_rounds()
    for r in rows:
        r["stage"] = 4
        r["test_metric"] = NAN
    s = summarize(rows)
    assert stage_boundaries(rows) == [] and s["stage_boundaries"] == []
    assert s["best_metric"] is None and s["best_round"] is None and s["final_metric"] is None


def test_write_summary_json_nan_to_null_sorted(tmp_path) -> None:
    s = summarize(_six_rounds(), extra={"odd": NAN, "nested": {"b": math.inf, "a": 1}})
    path = write_summary_json(tmp_path / "out" / "summary.json", s)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["odd"] is None and data["nested"] == {"a": 1, "b": None}
    assert data["total_bytes"] == 1800 and data["stage_boundaries"] == [3, 5]
    assert list(data) == sorted(data)
    assert text.startswith('{\n  "')
