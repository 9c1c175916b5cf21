"""Plots of a run and of several runs: test metric vs rounds, two-way bytes, FLOPs.

matplotlib is imported inside the functions (importing the package stays
fast and works without it) and drives an Agg canvas directly rather than
pyplot, so no global backend is switched and no window can open on a
headless machine or inside a user's notebook session.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from fedml_progfed.report.metrics import PathLike, Row, is_missing
from fedml_progfed.report.summary import stage_boundaries

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_GIGA = 1e9

#: x-axis column -> (file name stem, axis label, divisor for the axis unit).
_AXES: dict[str, tuple[str, str, float]] = {
    "round": ("rounds", "communication round", 1.0),
    "cum_bytes": ("bytes", "cumulative two-way communication (GB)", _GIGA),
    "cum_flops": ("flops", "cumulative client compute (GFLOPs)", _GIGA),
}

# Above this many tested rounds markers turn into clutter; draw the line only.
_MAX_MARKED_POINTS = 60


def _new_figure() -> tuple["Figure", "Axes"]:
    """A figure bound to an Agg canvas (PNG output without pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _tested_points(rows: Sequence[Row], x_key: str) -> tuple[list[float], list[float]]:
    """(x, metric in %) of the rounds that have a test; untested rounds are skipped."""
    divisor = _AXES[x_key][2]
    xs: list[float] = []
    ys: list[float] = []
    for row in rows:
        if is_missing(row["test_metric"]):
            continue
        xs.append(float(row[x_key]) / divisor)
        ys.append(100.0 * float(row["test_metric"]))
    return xs, ys


def _plot_series(ax: "Axes", xs: list[float], ys: list[float], **style: Any) -> None:
    marker = "o" if len(xs) <= _MAX_MARKED_POINTS else None
    ax.plot(xs, ys, marker=marker, markersize=3, linewidth=1.5, **style)


def _finish(fig: "Figure", ax: "Axes", x_key: str, y_label: str, title: str, path: Path) -> Path:
    ax.set_xlabel(_AXES[x_key][1])
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_run(
    rows: Sequence[Row],
    out_dir: PathLike,
    title: str,
    *,
    metric_label: str = "test metric (%)",
) -> list[Path]:
    """Plot one run's test metric against rounds, cumulative bytes and FLOPs.

    Parameters
    ----------
    rows : sequence of mapping
        Metrics rows in round order.
    out_dir : str or os.PathLike
        Folder for the PNGs; created if needed.
    title : str
        Figure title (e.g. run name).
    metric_label : str, optional
        y-axis label, e.g. ``"test accuracy (%)"`` or ``"test Dice (%)"``.

    Returns
    -------
    list of pathlib.Path
        ``metric_vs_rounds.png``, ``metric_vs_bytes.png``,
        ``metric_vs_flops.png``. Stage boundaries (first round of each new
        stage) are dotted vertical lines, placed on the bytes/FLOPs axes at
        the cumulative cost of that round.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    boundaries = stage_boundaries(rows)
    by_round = {row["round"]: row for row in rows}
    written: list[Path] = []
    for x_key, (stem, _, divisor) in _AXES.items():
        fig, ax = _new_figure()
        xs, ys = _tested_points(rows, x_key)
        if xs:
            _plot_series(ax, xs, ys, color="C0", label=title)
        else:
            ax.text(0.5, 0.5, "no test rounds", ha="center", va="center", transform=ax.transAxes)
        for i, boundary in enumerate(boundaries):
            row = by_round[boundary]
            x = float(row[x_key]) / divisor
            ax.axvline(
                x,
                color="0.4",
                linestyle=":",
                linewidth=1.2,
                label="stage boundary" if i == 0 else None,
            )
            # Name the stage that starts here, just inside the top of the axes.
            ax.text(
                x,
                0.98,
                f" stage {row['stage']}",
                transform=ax.get_xaxis_transform(),
                ha="left",
                va="top",
                fontsize="x-small",
                color="0.3",
            )
        written.append(_finish(fig, ax, x_key, metric_label, title, out / f"metric_vs_{stem}.png"))
    return written


def plot_comparison(
    runs: Mapping[str, Sequence[Row]],
    out_dir: PathLike,
    *,
    title: Optional[str] = None,
    metric_label: str = "test metric (%)",
) -> list[Path]:
    """Plot several runs on shared axes: metric vs rounds, bytes and FLOPs.

    Parameters
    ----------
    runs : mapping of str to sequence of rows
        Run name (legend label) -> metrics rows.
    out_dir : str or os.PathLike
        Folder for the PNGs; created if needed.
    title : str, optional
        Figure title; defaults to the run names joined by " vs ".
    metric_label : str, optional
        y-axis label.

    Returns
    -------
    list of pathlib.Path
        ``compare_metric_vs_rounds.png``, ``compare_metric_vs_bytes.png``,
        ``compare_metric_vs_flops.png``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = title if title is not None else " vs ".join(runs)
    written: list[Path] = []
    for x_key, (stem, _, _) in _AXES.items():
        fig, ax = _new_figure()
        for i, (name, rows) in enumerate(runs.items()):
            xs, ys = _tested_points(rows, x_key)
            # Label even an empty series so the legend still lists every run.
            _plot_series(ax, xs, ys, color=f"C{i % 10}", label=name)
        written.append(
            _finish(fig, ax, x_key, metric_label, title, out / f"compare_metric_vs_{stem}.png")
        )
    return written


def plot_effective_movement(rows: Sequence[Row], threshold: float, out_dir: PathLike) -> Path:
    """ProFL's effective movement per round, one colour per step, with the freezing threshold."""
    fig, ax = _new_figure()
    steps: dict[Any, tuple[list[float], list[float]]] = {}
    for row in rows:
        if is_missing(row.get("em")):
            continue
        label = f"{row['phase']} {row['block']}" + (" (distil B)" if row.get("objective") == "mse" else "")
        xs, ys = steps.setdefault((row["step"], label), ([], []))
        xs.append(float(row["round"]))
        ys.append(float(row["em"]))
    for i, ((_, label), (xs, ys)) in enumerate(sorted(steps.items())):
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, color=f"C{i % 10}", label=label)
    ax.axhline(threshold, color="0.3", linestyle="--", linewidth=1.0, label=f"threshold {threshold}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("communication round")
    ax.set_ylabel("effective movement")
    ax.set_title("ProFL: effective movement of the block being trained")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="x-small", ncol=2)
    fig.tight_layout()
    path = Path(out_dir) / "em_per_step.png"
    fig.savefig(path, format="png")
    return path


def plot_memory(reports: Sequence[Mapping[str, Any]], budgets_bytes: Sequence[int] | None, out_dir: PathLike) -> Path:
    """Measured training peak of each step (bars) against the clients' budgets (sorted, as a line)."""
    fig, ax = _new_figure()
    labels = [r["key"] for r in reports]
    ax.bar(range(len(reports)), [r["measured_bytes"] / 1e6 for r in reports], color="C0", label="measured peak")
    ax.plot(range(len(reports)), [r["estimated_bytes"] / 1e6 for r in reports], "o", color="C1", label="analytic estimate")
    if budgets_bytes:
        ordered = sorted(budgets_bytes)
        xs = [i * (len(reports) - 1) / max(1, len(ordered) - 1) for i in range(len(ordered))]
        ax.plot(xs, [b / 1e6 for b in ordered], color="C2", linewidth=1.2, label="client budgets (sorted)")
    ax.set_xticks(range(len(reports)), labels, rotation=45, ha="right", fontsize="x-small")
    ax.set_ylabel("MB (10^6 bytes)")
    ax.set_title("peak training memory per step")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    path = Path(out_dir) / "memory_per_step.png"
    fig.savefig(path, format="png")
    return path
