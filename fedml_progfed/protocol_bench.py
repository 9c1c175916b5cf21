"""``python -m fedml_progfed.bench --protocol --out DIR``: ProgFed's headline claim, with error bars.

The paper reports about 2x fewer two-way bytes to reach 98 % of the baseline's best
("practicable performance", Sec. 4.2-4.3). This reruns, on Fashion-MNIST with the
paper's ConvNet, CIFAR-10's federated protocol of Table 7 as far as a 2-core machine
allows: 100 IID clients, 10 per round, batch 50, 5 local epochs, SGD lr 0.1 with
momentum 0.9 and weight decay 1e-4 under a cosine over T, S = 4 with the guideline
schedule, plain averaging (the authors' settings, research notes sec. 4) and the
longest T that fits, for 3 seeds. Per seed: e2e, ProgFed, ProgFed with ``extra``
warm-up and ProgFed with a learning-rate restart at every growth (the authors used
both). Reported: mean and spread over seeds of the bytes and FLOPs ratios to first
reach 90/95/98/99 % of that seed's e2e best, and of the final accuracy difference.
Nothing is tuned on the test set beyond what the protocol fixes.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from fedml_progfed.config import load_config
from fedml_progfed.data import load_federated_data
from fedml_progfed.report import compare_runs, plot_comparison, summarize, write_summary_json

FRACTIONS = (0.9, 0.95, 0.98, 0.99)
PROTOCOL = [
    "data_args.partition_method=iid",
    "train_args.client_num_in_total=100",
    "train_args.client_num_per_round=10",
    "train_args.batch_size=50",
    "train_args.epochs=5",
    "train_args.learning_rate=0.1",
    "train_args.momentum=0.9",
    "train_args.weight_decay=0.0001",
    "progfed_args.progfed_lr_schedule=cosine",
    "progfed_args.progfed_lr_min=0.0",
    "progfed_args.progfed_stages=4",
    "progfed_args.progfed_schedule=null",
    "progfed_args.progfed_aggregation_weights=uniform",
    "progfed_args.progfed_checkpoint_every=0",
]
#: variant -> overrides on top of the protocol (e2e is the baseline of its seed)
VARIANTS = {
    "e2e": ["progfed_args.progfed_strategy=e2e"],
    "progfed": ["progfed_args.progfed_strategy=progfed"],
    "progfed-extra-warmup": ["progfed_args.progfed_strategy=progfed", "progfed_args.progfed_warmup_rounds=2",
                             "progfed_args.progfed_warmup_mode=extra"],
    "progfed-lr-restart": ["progfed_args.progfed_strategy=progfed", "progfed_args.progfed_lr_restart_at_growth=true"],
}


def run_protocol(
    quickstart: Path, out: Path, rounds: int, seeds: tuple[int, ...], test_every: int, extra: tuple[str, ...] = (),
    variants: tuple[str, ...] = tuple(VARIANTS),
) -> dict[str, Any]:
    """Train the chosen variants (e2e always, as the baseline) for every seed; aggregate the cost-to-target ratios."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--protocol-variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    chosen = {name: VARIANTS[name] for name in VARIANTS if name == "e2e" or name in variants}
    base = [*PROTOCOL, f"train_args.comm_round={rounds}", f"validation_args.frequency_of_the_test={test_every}", *extra]
    runs: dict[str, list[dict]] = {}
    per_seed: dict[int, dict[str, Any]] = {}
    started = time.perf_counter()
    for seed, rows_by_variant in seeded_rows(quickstart, base, seeds, chosen, out):
        runs.update({f"seed{seed}-{variant}": rows for variant, rows in rows_by_variant.items()})
        per_seed[seed] = _seed_result(rows_by_variant)
    result = {"rounds": rounds, "seeds": list(seeds), "protocol": base, "variants": list(chosen),
              "per_seed": per_seed, "summary": _aggregate(per_seed), "wall_s": time.perf_counter() - started}
    write_summary_json(out / "protocol.json", result)
    (out / "protocol.txt").write_text(format_protocol(result) + "\n")
    plot_comparison(runs, out, title="metric vs cost, every seed")
    return result


def seeded_runs(cf: Path, base: Sequence[str], seed: int, runs: Mapping[str, Sequence[str]], out: Path
                ) -> Iterator[tuple[str, list[dict], dict[str, Any], Any]]:
    """Each named run (overrides on top of ``base``) of one seed, on that seed's one partition.

    Yields (name, rows, summary, config); every run writes its folder ``out/seed<seed>-<name>``.
    """
    from fedml_progfed.runners.experiment import _train_and_write
    from fedml_progfed.runners.run_dir import prepare_out

    seeded = [*base, f"common_args.random_seed={seed}"]
    _, config = load_config(cf, seeded)
    data = load_federated_data(config)  # loaded once: every run of the seed sees the very same partition
    for name, extra in runs.items():
        sections, run_config = load_config(cf, [*seeded, *extra])
        folder = out / f"seed{seed}-{name}"
        prepare_out(folder, overwrite=True)
        rows, summary = _train_and_write(run_config, sections, folder, f"seed{seed}-{name}", False, data)
        yield name, rows, summary, run_config


def seeded_rows(cf: Path, base: Sequence[str], seeds: Sequence[int], runs: Mapping[str, Sequence[str]], out: Path
                ) -> Iterator[tuple[int, dict[str, list[dict]]]]:
    """Per seed, every named run's metrics rows (see :func:`seeded_runs`)."""
    for seed in seeds:
        yield seed, {name: rows for name, rows, _, _ in seeded_runs(cf, base, seed, runs, out)}


def _seed_result(rows_by_variant: dict[str, list[dict]]) -> dict[str, Any]:
    baseline = rows_by_variant["e2e"]
    base_summary = summarize(baseline)
    out = {"e2e_best": base_summary["best_metric"], "e2e_final": base_summary["final_metric"]}
    for variant, rows in rows_by_variant.items():
        if variant == "e2e":
            continue
        s = summarize(rows)
        targets = {}
        for entry in compare_runs(baseline, rows, FRACTIONS):
            reached = entry["candidate_bytes"] is not None and entry["baseline_bytes"]
            targets[str(entry["fraction"])] = {
                "bytes_ratio": entry["candidate_bytes"] / entry["baseline_bytes"] if reached else None,
                "flops_ratio": entry["candidate_flops"] / entry["baseline_flops"] if reached else None,
            }
        out[variant] = {
            "final": s["final_metric"], "final_diff": s["final_metric"] - base_summary["final_metric"],
            "total_bytes_ratio": s["total_bytes"] / base_summary["total_bytes"],
            "total_flops_ratio": s["total_flops"] / base_summary["total_flops"], "targets": targets,
        }
    return out


def _spread(values: list[float | None]) -> dict[str, Any]:
    reached = [v for v in values if v is not None]
    if not reached:
        return {"mean": None, "std": None, "min": None, "max": None, "reached": 0}
    return {"mean": statistics.fmean(reached), "std": statistics.pstdev(reached) if len(reached) > 1 else 0.0,
            "min": min(reached), "max": max(reached), "reached": len(reached)}


def _aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for variant in [v for v in VARIANTS if v != "e2e" and all(v in r for r in per_seed.values())]:
        seeds = [per_seed[s][variant] for s in per_seed]
        summary[variant] = {
            "final_diff": _spread([r["final_diff"] for r in seeds]),
            "total_bytes_ratio": _spread([r["total_bytes_ratio"] for r in seeds]),
            "targets": {
                str(f): {key: _spread([r["targets"][str(f)][key] for r in seeds]) for key in ("bytes_ratio", "flops_ratio")}
                for f in FRACTIONS
            },
        }
    return summary


def format_protocol(result: dict[str, Any]) -> str:
    """The table: mean ± std (min-max) over seeds; 'reached k/n' when some seeds never reached a target."""
    n = len(result["seeds"])

    def cell(spread: dict[str, Any], pct: bool = False) -> str:
        if spread["mean"] is None:
            return f"n/r (0/{n})"
        scale = 100.0 if pct else 1.0
        text = f"{scale * spread['mean']:+.2f} ± {scale * spread['std']:.2f}" if pct else f"{spread['mean']:.3f} ± {spread['std']:.3f}"
        return text + ("" if spread["reached"] == n else f" ({spread['reached']}/{n})")

    lines = [
        f"ProgFed vs e2e, CIFAR-10 protocol of Table 7 on Fashion-MNIST, T = {result['rounds']}, seeds {result['seeds']}",
        "mean ± std over seeds; ratios are ProgFed cost / e2e cost to first reach a fraction of that seed's e2e best",
        "",
        f"{'variant':22} {'final acc diff (points)':>24} {'total bytes':>14}"
        + "".join(f" {'bytes to ' + str(int(f * 100)) + ' %':>16}" for f in FRACTIONS),
    ]
    for variant, s in result["summary"].items():
        lines.append(
            f"{variant:22} {cell(s['final_diff'], pct=True):>24} {cell(s['total_bytes_ratio']):>14}"
            + "".join(f" {cell(s['targets'][str(f)]['bytes_ratio']):>16}" for f in FRACTIONS)
        )
    lines += ["", f"{'variant':22}" + "".join(f" {'FLOPs to ' + str(int(f * 100)) + ' %':>16}" for f in FRACTIONS)]
    for variant, s in result["summary"].items():
        lines.append(f"{variant:22}" + "".join(f" {cell(s['targets'][str(f)]['flops_ratio']):>16}" for f in FRACTIONS))
    e2e = [result["per_seed"][s]["e2e_final"] for s in result["per_seed"]]
    lines += ["", f"e2e final accuracy per seed: {', '.join(f'{100 * v:.2f} %' for v in e2e)}",
              f"took {result['wall_s'] / 60:.1f} min"]
    return "\n".join(lines)

