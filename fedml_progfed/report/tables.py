"""Fixed-width text table comparing runs against a baseline, as the paper reports.

Two blocks: per-run results (final/best metric, total two-way bytes, client
FLOPs, wall time, change vs the baseline; ProgFed Tables 2-3), then the cost
to first reach each fraction of the baseline's best metric (Fig. 3-4). Changes
are written like the paper's "CR" columns: ``-27.3 %`` means 27.3 % cheaper
than the baseline. Plain string formatting only, so it works anywhere.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from fedml_progfed.report.metrics import Row
from fedml_progfed.report.summary import summarize
from fedml_progfed.report.targets import (
    DEFAULT_FRACTIONS,
    _reduction,
    compare_runs,
    fraction_label,
)

NOT_REACHED = "n/r"
_MB = 1e6
_GFLOP = 1e9


def _pct(value: Optional[float]) -> str:
    """Metric fraction as a percentage with two decimals; '-' when absent."""
    return "-" if value is None else f"{100.0 * value:.2f}"


def _amount(value: Optional[float], unit: float) -> str:
    """Cost in display units; small values keep significant digits."""
    if value is None:
        return NOT_REACHED
    scaled = float(value) / unit
    # Tiny smoke-test runs cost fractions of an MB: fixed 2 decimals would
    # print 0.00 for every run and hide the comparison.
    if scaled != 0 and abs(scaled) < 0.01:
        return f"{scaled:.2e}"
    return f"{scaled:,.2f}"


def _change(reduction: Optional[float]) -> str:
    """A reduction ``1 - cand/base`` written as the signed change, e.g. '-27.3 %'."""
    if reduction is None:
        return NOT_REACHED
    return f"{-100.0 * reduction:+.1f} %"


def _memory_cells(memory: Mapping[str, Mapping], name: str, baseline: str) -> list[str]:
    """Peak training memory (MB), its ratio to the baseline's, and the share of clients able to train."""
    entry, base = memory.get(name, {}), memory.get(baseline, {})
    peak, base_peak = entry.get("peak_mem_mb"), base.get("peak_mem_mb")
    ratio = "ref" if name == baseline else ("-" if not peak or not base_peak else f"{peak / base_peak:.3f}")
    low, high = entry.get("eligible_share_min"), entry.get("eligible_share_max")
    able = "-" if low is None else (f"{100 * low:.0f} %" if low == high else f"{100 * low:.0f}-{100 * high:.0f} %")
    return ["-" if peak is None else f"{peak:.1f}", ratio, able]


def _client_round_cells(rows: Sequence[Row], total_bytes: float) -> list[str]:
    """Client-rounds (updates merged over the run) and two-way MB per client-round."""
    client_rounds = sum(int(r["num_clients"]) for r in rows)
    per = "-" if not client_rounds else _amount(total_bytes / client_rounds, _MB)
    return [str(client_rounds), per]


def _render(headers: Sequence[str], body: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Lay out columns: the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [len(h) for h in headers]
    for cells in body:
        widths = [max(w, len(c)) for w, c in zip(widths, cells)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(parts).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(c) for c in body]


def format_comparison_table(
    runs: Mapping[str, Sequence[Row]],
    baseline: str,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    memory: Optional[Mapping[str, Mapping]] = None,
) -> str:
    """Readable comparison of runs against ``baseline``.

    Parameters
    ----------
    runs : mapping of str to sequence of rows
        Run name -> metrics rows. The baseline is listed first, the others in
        mapping order.
    baseline : str
        Name in ``runs`` of the reference run (end-to-end training).
    fractions : sequence of float
        Targets as fractions of the baseline's best test metric.
    memory : mapping of str to mapping, optional
        Run name -> ``peak_mem_mb`` (the largest step's measured training peak) and
        ``eligible_share_min`` / ``_max`` (share of clients whose budget fits a step);
        adds the columns ``peak MB``, ``peak vs base`` and ``clients able``, with
        ``client-rnds`` (updates merged over the run) and ``MB/client-rnd``.

    Returns
    -------
    str
        Multi-line fixed-width table (no trailing newline). Bytes are two-way
        (down + up) in MB = 10^6 bytes, compute is client GFLOPs = 10^9 FLOPs,
        ``n/r`` marks a target a run never reached.

    Raises
    ------
    ValueError
        If ``baseline`` is not in ``runs`` or has no round with a test.
    """
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the runs: {', '.join(runs)}")
    names = [baseline] + [n for n in runs if n != baseline]
    summaries = {name: summarize(runs[name]) for name in names}
    base = summaries[baseline]

    # Block 1: per-run totals.
    headers = [
        "run",
        "rounds",
        "final %",
        "best % (round)",
        "total MB",
        "client GFLOPs",
        "wall s",
        "bytes vs base",
        "FLOPs vs base",
    ]
    if memory:
        headers += ["peak MB", "peak vs base", "clients able", "client-rnds", "MB/client-rnd"]
    body = []
    for name in names:
        s = summaries[name]
        best = "-" if s["best_metric"] is None else f"{_pct(s['best_metric'])} ({s['best_round']})"
        if name == baseline:
            d_bytes = d_flops = "ref"
        else:
            d_bytes = _change(_reduction(s["total_bytes"], base["total_bytes"]))
            d_flops = _change(_reduction(s["total_flops"], base["total_flops"]))
            # A run with zero baseline cost has no meaningful ratio, not "not reached".
            d_bytes = "-" if d_bytes == NOT_REACHED else d_bytes
            d_flops = "-" if d_flops == NOT_REACHED else d_flops
        body.append(
            [
                name,
                str(s["rounds"]),
                _pct(s["final_metric"]),
                best,
                _amount(s["total_bytes"], _MB),
                _amount(s["total_flops"], _GFLOP),
                f"{s['wall_s']:.1f}",
                d_bytes,
                d_flops,
                *(_memory_cells(memory, name, baseline) + _client_round_cells(runs[name], s["total_bytes"])
                  if memory else []),
            ]
        )
    lines = [f"Per-run results (baseline: {baseline})"]
    lines += _render(headers, body)

    # Block 2: cost to first reach each fraction of the baseline's best.
    if base["best_metric"] is None:
        raise ValueError(f"baseline {baseline!r} has no round with a test_metric")
    comparisons = {name: compare_runs(runs[baseline], runs[name], fractions) for name in names}
    headers = ["target", "run", "round", "MB", "GFLOPs", "bytes vs base", "FLOPs vs base"]
    body = []
    for i, fraction in enumerate(fractions):
        for j, name in enumerate(names):
            entry = comparisons[name][i]
            label = f"{fraction_label(fraction)} ({_pct(entry['target'])} %)" if j == 0 else ""
            reached = entry["candidate_round"] is not None
            if name == baseline:
                d_bytes = d_flops = "ref" if reached else NOT_REACHED
            else:
                d_bytes = _change(entry["bytes_reduction"])
                d_flops = _change(entry["flops_reduction"])
            body.append(
                [
                    label,
                    name,
                    str(entry["candidate_round"]) if reached else NOT_REACHED,
                    _amount(entry["candidate_bytes"], _MB),
                    _amount(entry["candidate_flops"], _GFLOP),
                    d_bytes,
                    d_flops,
                ]
            )
    lines += [
        "",
        f"Cost to first reach a fraction of the baseline's best test metric "
        f"({_pct(base['best_metric'])} %)",
    ]
    lines += _render(headers, body, left=2)
    lines += [
        "",
        "MB: two-way (down + up) bytes / 1e6; GFLOPs: client FLOPs / 1e9; "
        "vs base: change relative to the baseline (negative = cheaper); n/r: not reached.",
    ]
    return "\n".join(lines)
