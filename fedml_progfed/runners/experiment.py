"""Experiments behind the CLI: one run, or ProgFed against end-to-end on identical everything."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from fedml_progfed.config import RunConfig, apply_overrides, flatten, load_config
from fedml_progfed.report import compare_runs, format_comparison_table, plot_comparison, write_summary_json
from fedml_progfed.report.run_folder import write_run_folder
from fedml_progfed.data import load_federated_data
from fedml_progfed.runners.federation import Federation, build_federation
from fedml_progfed.runners.standalone import run_with_progress

log = logging.getLogger("fedml_progfed")

BASELINE = "e2e"


def _train_and_write(
    config: RunConfig, sections: dict, out: Path, label: str, show_progress: bool, data=None
) -> tuple[list[dict], dict[str, Any]]:
    fed = build_federation(config, sections, data)
    log.info(
        "%s: %s, %d stages, %s, %d clients (%d per round), %d rounds on %s",
        label, config.model, fed.server.model.num_stages, describe_plan(fed), config.client_num_in_total,
        config.client_num_per_round, fed.total_rounds, fed.device,
    )
    rows = run_with_progress(fed, label, show_progress)
    summary = write_results(out, sections, fed, label, runtime="standalone")
    return rows, summary


def measure_memory(fed: Federation) -> list[dict[str, Any]]:
    """Peak training memory of one client step per stage of the schedule, measured and estimated."""
    from fedml_progfed.core.memory import measure_training_memory
    from fedml_progfed.core.staged_model import active_names

    train_local = fed.data.fedml_dataset[5]
    x, y = next(iter(train_local[next(iter(train_local))]))
    model = fed.server.model
    stages = sorted({row["stage"] for row in fed.server.state.ledger.rows})
    return [
        measure_training_memory(
            model, stage, active_names(model, stage), x, y, fed.server.task.loss, fed.config.momentum, fed.device
        ).as_dict()
        for stage in stages
    ]


def describe_plan(fed: Federation) -> str:
    """The algorithm's schedule in one line for logs (ProgFed: stages and rounds)."""
    schedule = getattr(fed.server.algorithm, "schedule", None)
    return f"schedule {schedule.describe()}" if schedule is not None else fed.server.algorithm.name


def write_results(
    out: Path, sections: dict, fed: Federation, label: str, runtime: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run folder from the aggregator's ledger; the same for every runtime."""
    config = fed.config
    more = dict(extra or {})
    extra = {
        "label": label,
        "runtime": runtime,
        "strategy": config.progfed.strategy,
        "optimizer": config.progfed.optimizer,
        "model": config.model,
        "dataset": config.dataset,
        "seed": config.random_seed,
        "metric_name": fed.server.task.metric_name,
        "plan": describe_plan(fed),
        "device": str(fed.device),
    }
    ledger = fed.server.state.ledger
    extra.update(more)
    extra["ledger"] = ledger.totals()
    extra["memory"] = measure_memory(fed)
    summary = write_run_folder(out, sections, ledger.rows, extra, title=label)
    write_summary_json(out / "ledger.json", {"totals": ledger.totals(), "per_client": ledger.per_client()})
    # The final global model (every stage's modules, heads included) for reuse and for checks.
    torch.save({k: v.cpu() for k, v in fed.server.model.state_dict().items()}, out / "global_model.pt")
    return summary


def run_experiment(cf: str, overrides: Sequence[str], out: Path, show_progress: bool = True) -> dict[str, Any]:
    """Train the configuration as given and write its results folder; returns the summary."""
    sections, config = load_config(cf, overrides)
    _, summary = _train_and_write(config, sections, out, config.progfed.strategy, show_progress)
    return summary


TARGET_FRACTIONS = (0.5, 0.8, 0.9, 0.98, 0.99, 0.9995, 1.0)


def run_comparison(
    cf: str, overrides: Sequence[str], out: Path, show_progress: bool = True, variants: Sequence[str] | None = None
) -> str:
    """ProgFed and the e2e baseline for each uplink compression variant, on identical seeds, data and sampling.

    Writes a run folder per run (``out/<method>-<variant>``), ``out/comparison.json``
    (``runs`` and ``cost_to_target`` against the float e2e run's best metric, or the
    first variant's when float is not among them), ``out/comparison.txt`` and
    comparison plots with every run on one axis; returns the printed table.
    """
    sections, config = load_config(cf, overrides)
    variants = list(variants) if variants else [config.progfed.compression_up]
    for variant in variants:  # fail on a bad spec before any training
        load_config(cf, [*overrides, f"progfed_args.progfed_compression_up={variant}"])
    data = load_federated_data(config)  # loaded once: every run sees the very same partition
    runs: dict[str, list[dict]] = {}
    records = []
    for variant in variants:
        for method in ("progfed", BASELINE):
            extra = [f"progfed_args.progfed_strategy={method}", f"progfed_args.progfed_compression_up={variant}"]
            run_sections, run_config = load_config(cf, [*overrides, *extra]) if method == "progfed" else _e2e(cf, overrides, extra)
            name = f"{method}-{variant}"
            rows, summary = _train_and_write(run_config, run_sections, out / name, name, show_progress, data)
            runs[name] = rows
            records.append(
                {
                    "method": method,
                    "variant": variant,
                    "name": name,
                    "total_bytes_up": summary["total_bytes_up"],
                    "total_bytes_down": summary["total_bytes_down"],
                    "total_flops": summary["total_flops"],
                    "final_metric": summary["final_metric"],
                    "best_metric": summary["best_metric"],
                    "wall_s": summary["wall_s"],
                }
            )
    baseline = f"{BASELINE}-float" if "float" in variants else f"{BASELINE}-{variants[0]}"
    cost = {
        name: compare_runs(runs[baseline], rows, TARGET_FRACTIONS) for name, rows in runs.items() if name != baseline
    }
    table = format_comparison_table(runs, baseline=baseline)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.txt").write_text(table + "\n")
    write_summary_json(out / "comparison.json", {"baseline": baseline, "runs": records, "cost_to_target": cost})
    plot_comparison(runs, out)
    return table


def _e2e(cf: str, overrides: Sequence[str], extra: Sequence[str]):
    """The baseline's config: a ProgFed schedule has no meaning for e2e, so it is dropped."""
    sections, _ = load_config(cf, overrides)
    sections = apply_overrides(sections, extra)
    sections.get("progfed_args", {}).pop("progfed_schedule", None)
    return sections, RunConfig.from_flat(flatten(sections))
