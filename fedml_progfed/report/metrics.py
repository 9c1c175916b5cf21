"""The per-round ``metrics.csv`` of a run: column names, writer and reader.

One row per communication round. The first twelve columns are a fixed
contract (users' scripts index them by name), in this order:

``round``         communication round number
``stage``         active ProgFed stage ``s`` in that round (1-based)
``active_params`` parameters of the active sub-model ``M^s``
``bytes_down``    server -> clients bytes in that round (all sampled clients)
``bytes_up``      clients -> server bytes in that round
``cum_bytes``     running sum of ``bytes_down + bytes_up`` (two-way cost)
``client_flops``  client training FLOPs in that round
``cum_flops``     running sum of ``client_flops``
``train_loss``    mean client training loss
``test_loss``     test loss, NaN (an empty cell) on rounds without a test
``test_metric``   accuracy or Dice as a fraction in [0, 1], higher is better;
                  NaN (an empty cell) on rounds without a test
``wall_s``        wall-clock seconds spent in that round (not cumulative)

Extra columns (:data:`EXTRA_COLUMNS`) follow when the rows carry them; any
further keys are kept after those, in first-seen order, so nothing a runner
records is silently dropped.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from fedml_progfed.core.ledger import EXTRA_COLUMNS, METRIC_COLUMNS

#: A metrics row as produced by a runner or returned by :func:`read_metrics_csv`.
Row = Mapping[str, Any]
PathLike = Union[str, "os.PathLike[str]"]




def is_missing(value: Any) -> bool:
    """Return True for a cell that holds no value (None, NaN or empty string).

    Parameters
    ----------
    value : Any
        A cell of a metrics row.

    Returns
    -------
    bool
        Whether the cell counts as "no measurement in this round".
    """
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _as_number(value: Any) -> Any:
    """Plain Python int/float for numpy scalars and floats that hold an integer."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _columns_for(rows: Sequence[Row]) -> list[str]:
    """Fixed columns, then the extras present, then any other keys seen."""
    present: dict[str, None] = {}
    for row in rows:
        for key in row:
            present.setdefault(key, None)
    columns = list(METRIC_COLUMNS)
    columns += [c for c in EXTRA_COLUMNS if c in present]
    known = set(columns)
    columns += [c for c in present if c not in known]
    return columns


def _format_cell(value: Any) -> str:
    """Text for one cell; NaN/None become an empty cell, floats round-trip."""
    # numpy scalars and 0-d tensors: take the Python value so that str() gives
    # a plain number rather than e.g. "tensor(0.5)".
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if is_missing(value):
        return ""
    if isinstance(value, bool):
        # Written as 0/1 so the reader gets a number back, not the text "True".
        return str(int(value))
    if isinstance(value, float):
        # repr() is the shortest string that parses back to the same float.
        return repr(value)
    return str(value)


def _parse_cell(text: str) -> Any:
    """Inverse of :func:`_format_cell`: int, else float, else the text."""
    text = text.strip()
    if text == "":
        return float("nan")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def write_metrics_csv(path: PathLike, rows: Sequence[Row]) -> Path:
    """Write one row per round to ``path`` as CSV.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; its parent folder is created if needed.
    rows : sequence of mapping
        Per-round rows. Every row must hold all of :data:`METRIC_COLUMNS`;
        NaN and None are written as empty cells.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    ValueError
        If a row lacks one of the fixed columns (the message names it).
    """
    for index, row in enumerate(rows):
        missing = [c for c in METRIC_COLUMNS if c not in row]
        if missing:
            where = f"row {index}"
            if "round" in row:
                where += f" (round {row['round']})"
            raise ValueError(
                f"metrics {where} is missing column {missing[0]!r}"
                + (f" (and {', '.join(map(repr, missing[1:]))})" if len(missing) > 1 else "")
                + f"; every row needs all of: {', '.join(METRIC_COLUMNS)}"
            )

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = _columns_for(rows)
    # Write next to the target and rename: a runner rewrites this file every
    # round, and a crash mid-write must not leave a truncated metrics.csv.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_format_cell(row.get(c)) for c in columns])
    os.replace(tmp, path)
    return path


def read_metrics_csv(path: PathLike) -> list[dict[str, Any]]:
    """Read a ``metrics.csv`` back into a list of rows.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`write_metrics_csv`.

    Returns
    -------
    list of dict
        One dict per round, keys in file column order. Integers come back as
        ``int``, other numbers as ``float``, empty cells as ``float('nan')``.

    Raises
    ------
    ValueError
        If the header lacks one of the fixed columns.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty; expected a metrics.csv header row")
        missing = [c for c in METRIC_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path} is missing column {missing[0]!r}; a metrics.csv needs all of: "
                + ", ".join(METRIC_COLUMNS)
            )
        rows = []
        for cells in reader:
            if not cells:
                continue
            # Short lines (a file cut mid-write by hand) read as empty cells.
            cells = cells + [""] * (len(header) - len(cells))
            rows.append({name: _parse_cell(cell) for name, cell in zip(header, cells)})
    return rows


class MetricsFile:
    """``metrics.csv`` kept up to date round by round: the new row is appended and flushed.

    The whole file is rewritten (atomically, through :func:`write_metrics_csv`) only when
    a row brings a column the header lacks, or the first time (a resumed run starts
    from its checkpoint's rows, so rows after the checkpoint are never duplicated).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._columns: list[str] | None = None
        self._written = 0

    def update(self, rows: Sequence[Row]) -> None:
        """Make the file hold exactly ``rows`` (all rounds so far)."""
        columns = _columns_for(rows)
        if self._columns != columns or len(rows) != self._written + 1:
            write_metrics_csv(self.path, rows)
        else:
            with open(self.path, "a", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow([_format_cell(rows[-1].get(c)) for c in columns])
                fh.flush()
                os.fsync(fh.fileno())
        self._columns, self._written = columns, len(rows)
