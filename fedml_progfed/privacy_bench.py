"""``python -m fedml_progfed.bench --privacy --out DIR``: ProgFed against e2e at the same privacy spent.

Per seed, on one partition (issue 21's measurement): ``progfed`` and ``e2e`` with the
configuration's client-level DP (same clip, noise, sampling and rounds, so the same
(epsilon, delta)), and both without DP for reference. Reported as mean ± std over seeds:
final and best accuracy, two-way bytes and the epsilon each run spent.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from fedml_progfed.protocol_bench import _spread, seeded_runs
from fedml_progfed.report import write_summary_json

METHODS = {
    "progfed-dp": ["progfed_args.progfed_strategy=progfed"],
    "e2e-dp": ["progfed_args.progfed_strategy=e2e", "progfed_args.progfed_stages=null"],
    "progfed": ["progfed_args.progfed_strategy=progfed", "dp_args.enable_dp=false"],
    "e2e": ["progfed_args.progfed_strategy=e2e", "progfed_args.progfed_stages=null", "dp_args.enable_dp=false"],
}
COLUMNS = ("final", "best", "two_way_mb", "epsilon")


def run_privacy_bench(cf: Path, out: Path, rounds: int | None, seeds: Sequence[int]) -> dict[str, Any]:
    """Every method for every seed; per-seed figures and their mean ± std."""
    base = ["progfed_args.progfed_checkpoint_every=0"] + ([f"train_args.comm_round={rounds}"] if rounds else [])
    started = time.perf_counter()
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        per_seed[seed] = {
            method: {"final": summary["final_metric"], "best": summary["best_metric"],
                     "two_way_mb": (summary["total_bytes_up"] + summary["total_bytes_down"]) / 1e6,
                     "epsilon": summary.get("privacy", {}).get("epsilon")}
            for method, rows, summary, _ in seeded_runs(cf, base, seed, METHODS, out)
        }
    summary = {m: {c: _spread([per_seed[s][m][c] for s in per_seed]) for c in COLUMNS} for m in METHODS}
    result = {"config": str(cf), "rounds": rounds, "seeds": list(seeds), "per_seed": per_seed, "summary": summary,
              "wall_s": time.perf_counter() - started}
    write_summary_json(out / "privacy_bench.json", result)
    (out / "privacy_bench.txt").write_text(format_privacy_bench(result) + "\n")
    return result


def format_privacy_bench(result: dict[str, Any]) -> str:
    """The table: mean ± std over seeds, one line per method."""
    def cell(spread: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
        if spread["mean"] is None:
            return "-"
        return f"{scale * spread['mean']:.{digits}f} ± {scale * spread['std']:.{digits}f}"

    lines = [f"client-level DP, {result['config']}, T = {result['rounds'] or 'as configured'}, seeds {result['seeds']} "
             f"(mean ± std)", "", f"{'method':12} {'final %':>15} {'best %':>15} {'two-way MB':>15} {'epsilon':>15}"]
    for method, s in result["summary"].items():
        lines.append(f"{method:12} {cell(s['final'], 100):>15} {cell(s['best'], 100):>15} "
                     f"{cell(s['two_way_mb'], digits=1):>15} {cell(s['epsilon'], digits=3):>15}")
    lines.append(f"took {result['wall_s'] / 60:.1f} min")
    return "\n".join(lines)
