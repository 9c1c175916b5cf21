"""Run totals for ``summary.json``: costs, final/best metric, stage boundaries."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from fedml_progfed.report.metrics import PathLike, Row, _as_number, is_missing


def stage_boundaries(rows: Sequence[Row]) -> list[int]:
    """Rounds where the stage changes (first round of every stage but the first).

    Parameters
    ----------
    rows : sequence of mapping
        Metrics rows in round order.

    Returns
    -------
    list of int
        ``round`` of each row whose ``stage`` differs from the previous row's.
    """
    boundaries: list[int] = []
    previous = None
    for row in rows:
        stage = row["stage"]
        if previous is not None and stage != previous:
            boundaries.append(_as_number(row["round"]))
        previous = stage
    return boundaries


def _total(rows: Sequence[Row], column: str) -> Any:
    """Sum of a column, skipping missing cells; stays an int for int columns."""
    return _as_number(sum(row[column] for row in rows if not is_missing(row[column])))


def _last_value(rows: Sequence[Row], column: str) -> tuple[Optional[float], Optional[int]]:
    """Last non-missing value of ``column`` and its round, or ``(None, None)``."""
    for row in reversed(rows):
        if not is_missing(row[column]):
            return float(row[column]), _as_number(row["round"])
    return None, None


def summarize(rows: Sequence[Row], extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Totals and headline numbers of one run.

    Parameters
    ----------
    rows : sequence of mapping
        Metrics rows (see :mod:`fedml_progfed.report.metrics`) in round order.
    extra : mapping, optional
        Further entries (config name, seed, ...) merged in last, so they win
        over computed keys of the same name.

    Returns
    -------
    dict
        ``rounds`` (number of rows), ``last_round``, ``num_stages``,
        ``stage_boundaries``, ``total_bytes_down``, ``total_bytes_up``,
        ``total_bytes`` (two-way), ``total_flops``, ``final_metric`` and
        ``final_metric_round`` (last round with a test), ``best_metric`` and
        ``best_round`` (first round reaching the maximum), ``final_test_loss``,
        ``final_train_loss``, ``wall_s`` (sum of per-round seconds). Values
        that do not exist (no test round) are None.
    """
    rows = list(rows)
    total_down = _total(rows, "bytes_down")
    total_up = _total(rows, "bytes_up")
    final_metric, final_metric_round = _last_value(rows, "test_metric")

    best_metric: Optional[float] = None
    best_round: Optional[int] = None
    for row in rows:
        value = row["test_metric"]
        # Strict '>' keeps the first round that reaches the best value.
        if not is_missing(value) and (best_metric is None or float(value) > best_metric):
            best_metric, best_round = float(value), _as_number(row["round"])

    summary: dict[str, Any] = {
        "rounds": len(rows),
        "last_round": _as_number(rows[-1]["round"]) if rows else None,
        "num_stages": len({_as_number(row["stage"]) for row in rows}),
        "stage_boundaries": stage_boundaries(rows),
        "total_bytes_down": total_down,
        "total_bytes_up": total_up,
        "total_bytes": _as_number(total_down + total_up),
        "total_flops": _total(rows, "client_flops"),
        "final_metric": final_metric,
        "final_metric_round": final_metric_round,
        "best_metric": best_metric,
        "best_round": best_round,
        "final_test_loss": _last_value(rows, "test_loss")[0],
        "final_train_loss": _last_value(rows, "train_loss")[0],
        "wall_s": float(_total(rows, "wall_s")),
    }
    if extra:
        summary.update(extra)
    return summary


def _jsonable(value: Any) -> Any:
    """Recursively turn a summary into plain JSON types; NaN/inf become None."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v) for v in items]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        # numpy scalars/arrays and tensors
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN; null is what every reader understands as "no value".
        return None
    return value


def write_summary_json(path: PathLike, summary: Mapping[str, Any]) -> Path:
    """Write ``summary`` as JSON (sorted keys, indent 2, NaN -> null).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; its parent folder is created if needed.
    summary : mapping
        Typically the result of :func:`summarize`.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: fail loudly rather than emit invalid JSON if a NaN slips by.
    text = json.dumps(_jsonable(summary), sort_keys=True, indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path
