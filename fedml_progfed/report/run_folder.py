"""The results folder of one run: resolved config, metrics.csv, summary.json and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from fedml_progfed.report.metrics import write_metrics_csv
from fedml_progfed.report.plots import plot_run
from fedml_progfed.report.summary import summarize, write_summary_json


def write_run_folder(
    out_dir: str | Path,
    sections: Mapping[str, Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any] | None = None,
    title: str = "",
) -> dict[str, Any]:
    """Write ``config.yaml``, ``metrics.csv``, ``summary.json`` and the plots; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump({k: dict(v) for k, v in sections.items()}, sort_keys=False))
    write_metrics_csv(out / "metrics.csv", rows)
    summary = summarize(rows, extra)
    write_summary_json(out / "summary.json", summary)
    plot_run(rows, out, title or out.name)
    return summary
