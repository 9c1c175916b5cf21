"""Experiments behind the CLI: one run, or ProgFed against end-to-end on identical everything."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from typing import Any, Sequence

from fedml_progfed.config import RunConfig, apply_overrides, load_config
from fedml_progfed.report import compare_runs, format_comparison_table, plot_comparison, write_summary_json
from fedml_progfed.report.run_folder import write_run_folder
from fedml_progfed.runners.federation import Federation, build_federation, load_data
from fedml_progfed.runners.standalone import run_with_progress

log = logging.getLogger("fedml_progfed")

BASELINE = "e2e"


def _train_and_write(
    config: RunConfig, sections: dict, out: Path, label: str, show_progress: bool, data=None
) -> tuple[list[dict], dict[str, Any]]:
    fed = build_federation(config, sections, data)
    schedule = fed.aggregator.schedule
    log.info(
        "%s: %s, %d stages, schedule %s, %d clients (%d per round), %d rounds on %s",
        label, config.model, fed.aggregator.model.num_stages,
        [(p.stage, p.rounds) for p in schedule.phases], config.client_num_in_total,
        config.client_num_per_round, config.comm_round, fed.device,
    )
    rows = run_with_progress(fed, label, show_progress)
    summary = write_results(out, sections, fed, label, runtime="standalone")
    return rows, summary


def write_results(out: Path, sections: dict, fed: Federation, label: str, runtime: str) -> dict[str, Any]:
    """The run folder from the aggregator's ledger; the same for every runtime."""
    config = fed.config
    extra = {
        "label": label,
        "runtime": runtime,
        "strategy": config.progfed.strategy,
        "optimizer": config.progfed.optimizer,
        "model": config.model,
        "dataset": config.dataset,
        "seed": config.random_seed,
        "metric_name": fed.aggregator.task.metric_name,
        "schedule": fed.aggregator.schedule.describe(),
        "device": str(fed.device),
    }
    summary = write_run_folder(out, sections, fed.aggregator.ledger.rows, extra, title=label)
    # The final global model (every stage's modules, heads included) for reuse and for checks.
    torch.save({k: v.cpu() for k, v in fed.aggregator.model.state_dict().items()}, out / "global_model.pt")
    return summary


def run_experiment(cf: str, overrides: Sequence[str], out: Path, show_progress: bool = True) -> dict[str, Any]:
    """Train the configuration as given and write its results folder; returns the summary."""
    sections, config = load_config(cf, overrides)
    _, summary = _train_and_write(config, sections, out, config.progfed.strategy, show_progress)
    return summary


def run_comparison(cf: str, overrides: Sequence[str], out: Path, show_progress: bool = True) -> str:
    """ProgFed and the e2e baseline with the same seed, data and client sampling.

    Writes ``out/progfed`` and ``out/e2e`` run folders, ``out/comparison.json``,
    ``out/comparison.txt`` and comparison plots; returns the printed table.
    """
    sections, config = load_config(cf, overrides)
    data = load_data(config)  # loaded once: both runs see the very same partition
    runs: dict[str, list[dict]] = {}
    summaries: dict[str, dict] = {}
    for strategy in ("progfed", BASELINE):
        variant = config.with_strategy(strategy)
        variant_sections = apply_overrides(sections, [f"progfed_args.progfed_strategy={strategy}"])
        if strategy == BASELINE:
            variant_sections["progfed_args"].pop("progfed_schedule", None)
        runs[strategy], summaries[strategy] = _train_and_write(
            variant, variant_sections, out / strategy, strategy, show_progress, data
        )
    table = format_comparison_table(runs, baseline=BASELINE)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.txt").write_text(table + "\n")
    write_summary_json(
        out / "comparison.json",
        {"summaries": summaries, "cost_to_target": compare_runs(runs[BASELINE], runs["progfed"])},
    )
    plot_comparison(runs, out)
    return table
