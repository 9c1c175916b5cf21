"""Comparison table text and PNG plots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedml_progfed
from fedml_progfed.report import format_comparison_table, plot_comparison, plot_run

NAN = float("nan")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(metrics, stages, bytes_per_stage, flops_per_stage) -> list[dict]:
    rows, cum_b, cum_f = [], 0, 0
    for i, (m, s) in enumerate(zip(metrics, stages)):
        b, f = bytes_per_stage[s - 1], flops_per_stage[s - 1]
        cum_b += b
        cum_f += f
        rows.append(
            {
                "round": i + 1, "stage": s, "active_params": b // 8,
                "bytes_down": b // 2, "bytes_up": b // 2, "cum_bytes": cum_b,
                "client_flops": f, "cum_flops": cum_f,
                "train_loss": 1.0 / (i + 1), "test_loss": NAN if m != m else 1.0 - m,
                "test_metric": m, "wall_s": 1.5,
                "warmup": 0, "lr": 0.1, "num_clients": 10,
            }
        )
    return rows


def _runs() -> dict[str, list[dict]]:
    e2e = _run(
        [0.40, 0.60, 0.785, 0.795, 0.80, 0.79], [1] * 6,
        bytes_per_stage=[2_000_000], flops_per_stage=[4e9],
    )
    progfed = _run(
        [0.50, 0.70, NAN, 0.793, 0.7997, 0.7999], [1, 1, 2, 2, 3, 3],
        bytes_per_stage=[500_000, 1_000_000, 2_000_000], flops_per_stage=[1e9, 2e9, 4e9],
    )
    return {"e2e": e2e, "progfed": progfed}


def test_table_lists_runs_fractions_and_not_reached() -> None:
    table = format_comparison_table(_runs(), baseline="e2e")
    for text in ("e2e", "progfed", "98 %", "99 %", "99.95 %", "100 %", "n/r"):
        assert text in table, text
    # progfed: 7.0 MB vs 12.0 MB in total -> -41.7 %.
    assert "-41.7 %" in table
    assert "12.00" in table and "7.00" in table


def test_table_baseline_must_be_a_run() -> None:
    with pytest.raises(ValueError, match="baseline"):
        format_comparison_table(_runs(), baseline="missing")


def test_plot_run_writes_pngs(tmp_path) -> None:
    paths = plot_run(_runs()["progfed"], tmp_path / "plots", title="progfed")
    names = sorted(p.name for p in paths)
    assert names == ["metric_vs_bytes.png", "metric_vs_flops.png", "metric_vs_rounds.png"]
    for p in paths:
        data = Path(p).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plot_run_without_tests_still_writes(tmp_path) -> None:
    rows = _runs()["progfed"]
    for r in rows:
        r["test_metric"] = NAN
    paths = plot_run(rows, tmp_path, title="untested")
    assert all(Path(p).stat().st_size > 0 for p in paths)


def test_plot_comparison_writes_pngs(tmp_path) -> None:
    paths = plot_comparison(_runs(), tmp_path)
    assert sorted(p.name for p in paths) == [
        "compare_metric_vs_bytes.png",
        "compare_metric_vs_flops.png",
        "compare_metric_vs_rounds.png",
    ]
    for p in paths:
        data = Path(p).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_import_does_not_load_matplotlib_or_fedml() -> None:
    root = Path(fedml_progfed.__file__).resolve().parents[1]
    code = (
        "import sys, fedml_progfed.report; "
        "print(any(m.split('.')[0] in ('matplotlib', 'fedml', 'torch') for m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
