"""``python -m fedml_progfed.bench --compression --out DIR``: ProgFed's "up to 50x at 0.1 % loss", two-way.

On the protocol bench's setting (ProgFed Table 7's federated protocol on Fashion-MNIST
with the paper's ConvNet, :data:`~fedml_progfed.protocol_bench.PROTOCOL`), per seed:
ProgFed and e2e, each with every codec in **both** directions (the uplink codes the
client's update; the broadcast the change since what each client holds,
:mod:`fedml_progfed.engine.references`, kept for the whole run; ``float`` is float both ways). Against float e2e
of the same seed: the final accuracy difference, the total two-way bytes, and the two-way
bytes to first reach 50/80/90/98/99 % of its best (the paper's Fig. 6 view), as ratios;
mean ± std over seeds, and a plot of accuracy against cumulative two-way bytes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from fedml_progfed.protocol_bench import PROTOCOL, _spread, seeded_rows
from fedml_progfed.report import compare_runs, plot_comparison, summarize, write_summary_json

CODECS = ("float", "lq8", "lq4", "lq2", "sp25", "sp10", "lq8+sp25", "lq8+sp10")
FRACTIONS = (0.5, 0.8, 0.9, 0.98, 0.99)
METHODS = ("e2e", "progfed")


def run_compression_bench(cf: Path, out: Path, rounds: int, seeds: Sequence[int], codecs: Sequence[str] = CODECS,
                          test_every: int = 2, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Every method with every codec for every seed; ratios against that seed's float e2e."""
    unknown = sorted(set(codecs) - set(CODECS))
    if unknown:
        raise ValueError(f"--codecs: unknown {', '.join(unknown)}; choose from {', '.join(CODECS)}")
    codecs = ["float", *[c for c in codecs if c != "float"]]  # float e2e is every seed's baseline
    # every client keeps its reconstruction for the whole run: with 10 of 100 clients a round a client
    # returns after about 10 rounds, past the default history of 8, and would be sent the full model
    base = [*PROTOCOL, f"train_args.comm_round={rounds}", f"validation_args.frequency_of_the_test={test_every}",
            f"progfed_args.progfed_broadcast_history={rounds}", *extra]
    runs = {f"{method}-{codec}": [f"progfed_args.progfed_strategy={method}", f"progfed_args.progfed_compression_up={codec}",
                                  f"progfed_args.progfed_compression_down={codec}"]
            for codec in codecs for method in METHODS}
    started = time.perf_counter()
    per_seed: dict[int, dict[str, Any]] = {}
    curves: dict[str, list[dict]] = {}
    for seed, rows_by_run in seeded_rows(cf, base, seeds, runs, out):
        curves.update({f"seed{seed}-{name}": rows for name, rows in rows_by_run.items()})
        per_seed[seed] = _against_float_e2e(rows_by_run)
    summary = {name: {"final_diff": _spread([per_seed[s][name]["final_diff"] for s in per_seed]),
                      "two_way_ratio": _spread([per_seed[s][name]["two_way_ratio"] for s in per_seed]),
                      "targets": {f: _spread([per_seed[s][name]["targets"][f] for s in per_seed])
                                  for f in map(str, FRACTIONS)}}
               for name in runs}
    result = {"config": str(cf), "rounds": rounds, "seeds": list(seeds), "per_seed": per_seed, "summary": summary,
              "wall_s": time.perf_counter() - started}
    write_summary_json(out / "compression_bench.json", result)
    (out / "compression_bench.txt").write_text(format_compression_bench(result) + "\n")
    plot_comparison(curves, out, title="accuracy vs cumulative two-way bytes, both directions compressed")
    return result


def _against_float_e2e(rows_by_run: dict[str, list[dict]]) -> dict[str, Any]:
    baseline = rows_by_run["e2e-float"]
    base = summarize(baseline)
    figures = {}
    for name, rows in rows_by_run.items():
        s = summarize(rows)
        targets = {}
        for entry in compare_runs(baseline, rows, FRACTIONS):
            reached = entry["candidate_bytes"] is not None and entry["baseline_bytes"]
            targets[str(entry["fraction"])] = entry["candidate_bytes"] / entry["baseline_bytes"] if reached else None
        figures[name] = {"final": s["final_metric"], "final_diff": s["final_metric"] - base["final_metric"],
                         "two_way_ratio": s["total_bytes"] / base["total_bytes"], "targets": targets}
    return figures


def format_compression_bench(result: dict[str, Any]) -> str:
    """One line per method and codec: accuracy difference, bytes ratios (mean ± std over seeds)."""
    def cell(spread: dict[str, Any], scale: float = 1.0, digits: int = 4) -> str:
        if spread["mean"] is None:
            return "never"
        reached = "" if spread["reached"] == len(result["seeds"]) else f" ({spread['reached']}/{len(result['seeds'])})"
        return f"{scale * spread['mean']:.{digits}f}±{scale * spread['std']:.{digits}f}{reached}"

    head = ["final diff (pt)", "two-way ratio", *[f"to {int(100 * f)} %" for f in FRACTIONS]]
    lines = [f"both directions compressed, {result['config']}, T = {result['rounds']}, seeds {result['seeds']}; "
             f"ratios against float e2e (mean ± std)", "",
             f"{'run':18}" + "".join(f" {h:>17}" for h in head)]
    for name, s in result["summary"].items():
        cells = [cell(s["final_diff"], 100, 2), cell(s["two_way_ratio"]),
                 *[cell(s["targets"][str(f)]) for f in FRACTIONS]]
        lines.append(f"{name:18}" + "".join(f" {c:>17}" for c in cells))
    lines.append(f"took {result['wall_s'] / 60:.1f} min")
    return "\n".join(lines)
