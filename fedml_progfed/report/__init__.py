"""Run outputs a user reads: ``metrics.csv``, ``summary.json``, tables and plots.

Nothing here imports fedml or torch; matplotlib is imported only when a plot
is drawn.
"""

from fedml_progfed.report.metrics import (
    EXTRA_COLUMNS,
    METRIC_COLUMNS,
    is_missing,
    read_metrics_csv,
    write_metrics_csv,
)
from fedml_progfed.report.plots import plot_comparison, plot_run
from fedml_progfed.report.summary import stage_boundaries, summarize, write_summary_json
from fedml_progfed.report.tables import format_comparison_table
from fedml_progfed.report.targets import (
    DEFAULT_FRACTIONS,
    best_metric,
    compare_runs,
    cost_to_target,
    fraction_label,
)

__all__ = [
    "DEFAULT_FRACTIONS",
    "EXTRA_COLUMNS",
    "METRIC_COLUMNS",
    "best_metric",
    "compare_runs",
    "cost_to_target",
    "format_comparison_table",
    "fraction_label",
    "is_missing",
    "plot_comparison",
    "plot_run",
    "read_metrics_csv",
    "stage_boundaries",
    "summarize",
    "write_metrics_csv",
    "write_summary_json",
]
