"""Cost to first reach a fraction of the baseline's best metric.

ProgFed (ICML 2022) Sec. 4.2-4.3, Fig. 3-4: the cost (FLOPs, two-way bytes)
each method spends until its test metric first reaches 98 %, 99 %, 99.95 % and
100 % of the best metric of the converged end-to-end baseline, and the
reduction relative to the baseline's cost for the same target.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from fedml_progfed.report.metrics import Row, _as_number, is_missing

#: Fractions of the baseline's best metric reported by the paper.
DEFAULT_FRACTIONS: tuple[float, ...] = (0.98, 0.99, 0.9995, 1.0)


def fraction_label(fraction: float) -> str:
    """Label of a target fraction as the paper writes it, e.g. ``"99.95 %"``.

    Parameters
    ----------
    fraction : float
        Target as a fraction of the baseline's best (0.9995).

    Returns
    -------
    str
        Percentage without trailing zeros followed by `` %``.
    """
    # round() first: 0.9995 * 100 is 99.94999999999999 in binary floating point.
    return f"{round(fraction * 100, 6):g} %"


def best_metric(rows: Sequence[Row]) -> Optional[float]:
    """Maximum non-missing ``test_metric`` of a run, or None without tests."""
    values = [float(r["test_metric"]) for r in rows if not is_missing(r["test_metric"])]
    return max(values) if values else None


def cost_to_target(rows: Sequence[Row], target_value: float) -> Optional[dict[str, Any]]:
    """First round whose test metric reaches ``target_value`` and its cost.

    Parameters
    ----------
    rows : sequence of mapping
        Metrics rows in round order; rounds without a test are skipped.
    target_value : float
        Absolute metric value to reach (``test_metric >= target_value``).

    Returns
    -------
    dict or None
        ``{"round", "metric", "cum_bytes", "cum_flops"}`` of the first round
        reaching the target, or None if the run never reaches it.
    """
    for row in rows:
        value = row["test_metric"]
        if not is_missing(value) and float(value) >= target_value:
            return {
                "round": _as_number(row["round"]),
                "metric": float(value),
                "cum_bytes": _as_number(row["cum_bytes"]),
                "cum_flops": _as_number(row["cum_flops"]),
            }
    return None


def _reduction(candidate: Optional[float], baseline: Optional[float]) -> Optional[float]:
    """``1 - candidate / baseline``, or None when either cost is unknown or zero."""
    if candidate is None or baseline is None or baseline <= 0:
        return None
    return 1.0 - float(candidate) / float(baseline)


def compare_runs(
    baseline_rows: Sequence[Row],
    candidate_rows: Sequence[Row],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> list[dict[str, Any]]:
    """Cost of baseline and candidate to first reach fractions of the baseline's best.

    Parameters
    ----------
    baseline_rows, candidate_rows : sequence of mapping
        Metrics rows of the reference run (end-to-end training) and of the run
        being compared (ProgFed).
    fractions : sequence of float
        Targets as fractions of the baseline's best ``test_metric``.

    Returns
    -------
    list of dict
        One entry per fraction with ``fraction``, ``target`` (absolute metric),
        ``baseline_round``/``baseline_bytes``/``baseline_flops``,
        ``candidate_round``/``candidate_bytes``/``candidate_flops`` (None when
        that run never reaches the target) and ``bytes_reduction`` /
        ``flops_reduction`` = ``1 - candidate / baseline`` (positive means the
        candidate is cheaper; None when either side is missing).

    Raises
    ------
    ValueError
        If the baseline has no round with a test metric.
    """
    best = best_metric(baseline_rows)
    if best is None:
        raise ValueError("baseline run has no round with a test_metric; cannot set targets")
    entries: list[dict[str, Any]] = []
    for fraction in fractions:
        target = fraction * best
        base = cost_to_target(baseline_rows, target)
        cand = cost_to_target(candidate_rows, target)
        base_bytes = base["cum_bytes"] if base else None
        base_flops = base["cum_flops"] if base else None
        cand_bytes = cand["cum_bytes"] if cand else None
        cand_flops = cand["cum_flops"] if cand else None
        entries.append(
            {
                "fraction": float(fraction),
                "target": target,
                "baseline_round": base["round"] if base else None,
                "baseline_bytes": base_bytes,
                "baseline_flops": base_flops,
                "candidate_round": cand["round"] if cand else None,
                "candidate_bytes": cand_bytes,
                "candidate_flops": cand_flops,
                "bytes_reduction": _reduction(cand_bytes, base_bytes),
                "flops_reduction": _reduction(cand_flops, base_flops),
            }
        )
    return entries
