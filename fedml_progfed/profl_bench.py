"""``python -m fedml_progfed.bench --profl --out DIR``: ProFL against the methods of its field, with error bars.

Per seed, on one partition and one draw of memory budgets (ProFL issue 16, part 5):
``e2e`` without budgets (the upper bound: every client trains the full model),
``e2e-exclusive`` (ExclusiveFL: only clients that fit the full model train), ``allsmall``
(everyone the width every client fits), ``heterofl`` (each client the widest it fits),
``depthfl`` (each client the deepest it fits), ``progfed`` (its stages gated by their own
memory) and ``profl``. Reported as mean ± std over seeds:
final and best accuracy, the costliest step's measured peak relative to the full model's,
the share of clients able to train that step, client-rounds, two-way bytes (total and per
client-round), client FLOPs, and for ProFL how many steps effective movement ended, how
many the cap ended and how many were skipped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from fedml_progfed.protocol_bench import _spread, seeded_runs
from fedml_progfed.report import write_summary_json
from fedml_progfed.report.metrics import is_missing

#: method -> overrides on top of the configuration (its budgets apply unless removed)
METHODS = {
    "e2e": ["progfed_args.progfed_strategy=e2e", "memory_args.memory_budgets=null", "progfed_args.progfed_schedule=null"],
    "e2e-exclusive": ["progfed_args.progfed_strategy=e2e", "progfed_args.progfed_schedule=null"],
    "allsmall": ["progfed_args.progfed_strategy=allsmall"],
    "heterofl": ["progfed_args.progfed_strategy=heterofl"],
    "depthfl": ["progfed_args.progfed_strategy=depthfl"],
    "progfed": ["progfed_args.progfed_strategy=progfed"],
    "profl": ["progfed_args.progfed_strategy=profl"],
}
COLUMNS = ("final", "best", "peak_vs_full", "able_share", "client_rounds", "two_way_mb", "mb_per_client_round",
           "client_gflops")


def run_profl_bench(cf: Path, out: Path, rounds: int | None, seeds: Sequence[int], extra: Sequence[str] = ()) -> dict[str, Any]:
    """Every method for every seed; per-seed figures and their mean ± std."""
    base = [*extra, "progfed_args.progfed_checkpoint_every=0"] + ([f"train_args.comm_round={rounds}"] if rounds else [])
    started = time.perf_counter()
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        figures = {method: _figures(rows, summary, config.client_num_in_total)
                   for method, rows, summary, config in seeded_runs(cf, base, seed, METHODS, out)}
        full = figures["e2e"]["peak_mb"]
        for method in figures.values():
            method["peak_vs_full"] = method["peak_mb"] / full if full else None
        per_seed[seed] = figures
    summary = {method: {column: _spread([per_seed[s][method][column] for s in per_seed]) for column in
                        (*COLUMNS, "steps_em", "steps_cap", "steps_skipped")} for method in METHODS}
    result = {"config": str(cf), "rounds": rounds, "seeds": list(seeds), "per_seed": per_seed, "summary": summary,
              "wall_s": time.perf_counter() - started}
    write_summary_json(out / "profl_bench.json", result)
    (out / "profl_bench.txt").write_text(format_profl_bench(result) + "\n")
    return result


def _figures(rows: list[dict], summary: dict[str, Any], num_clients: int) -> dict[str, Any]:
    """One run's figures (see the module docstring)."""
    measured = [r for r in rows if not is_missing(r.get("peak_mem_mb"))]
    costliest = max(measured, key=lambda r: r["peak_mem_mb"]) if measured else None
    client_rounds = sum(int(r["num_clients"]) for r in rows)
    two_way = summary["total_bytes_up"] + summary["total_bytes_down"]
    ended = [e.get("ended") for e in summary.get("algorithm_state", {}).get("log", [])]
    return {
        "final": summary["final_metric"],
        "best": summary["best_metric"],
        "peak_mb": costliest["peak_mem_mb"] if costliest else None,
        "able_share": costliest["eligible_clients"] / num_clients if costliest else None,
        "client_rounds": client_rounds,
        "two_way_mb": two_way / 1e6,
        "mb_per_client_round": two_way / 1e6 / client_rounds if client_rounds else None,
        "client_gflops": summary["total_flops"] / 1e9,
        "steps_em": ended.count("em"),
        "steps_cap": ended.count("cap"),
        "steps_skipped": ended.count("skipped"),
    }


def format_profl_bench(result: dict[str, Any]) -> str:
    """The table: mean ± std over seeds, one line per method."""
    def cell(spread: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
        if spread["mean"] is None:
            return "n/a"
        return f"{scale * spread['mean']:.{digits}f} ± {scale * spread['std']:.{digits}f}"

    head = ("final %", "best %", "peak/full", "able", "client-rnds", "two-way MB", "MB/client-rnd", "GFLOPs")
    lines = [f"ProFL and the memory baselines, {result['config']}, T = {result['rounds'] or 'as configured'}, "
             f"seeds {result['seeds']} (mean ± std)", "",
             f"{'method':14}" + "".join(f" {h:>17}" for h in head)]
    for method, s in result["summary"].items():
        cells = [cell(s["final"], 100, 2), cell(s["best"], 100, 2), cell(s["peak_vs_full"]), cell(s["able_share"]),
                 cell(s["client_rounds"], digits=0), cell(s["two_way_mb"], digits=1), cell(s["mb_per_client_round"]),
                 cell(s["client_gflops"], digits=1)]
        lines.append(f"{method:14}" + "".join(f" {c:>17}" for c in cells))
    profl = result["summary"]["profl"]
    lines += ["", f"ProFL steps ended by effective movement {cell(profl['steps_em'], digits=1)}, by the cap "
                  f"{cell(profl['steps_cap'], digits=1)}, skipped {cell(profl['steps_skipped'], digits=1)}",
              f"took {result['wall_s'] / 60:.1f} min"]
    return "\n".join(lines)
