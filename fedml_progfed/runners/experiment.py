"""Experiments behind the CLI: one run, or ProgFed against end-to-end on identical everything."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from safetensors.torch import save

from fedml_progfed.algorithms import ALGORITHMS
from fedml_progfed.algorithms.progfed import UPDATE_RULES
from fedml_progfed.config import RunConfig, apply_overrides, flatten, load_config
from fedml_progfed.errors import ConfigError
from fedml_progfed.report.metrics import is_missing, read_metrics_csv
from fedml_progfed.report.plots import plot_effective_movement, plot_memory
from fedml_progfed.report import compare_runs, format_comparison_table, plot_comparison, write_summary_json
from fedml_progfed.report.run_folder import write_run_folder
from fedml_progfed.data import load_federated_data
from fedml_progfed.runners.checkpoint import complete_checkpoints, latest_checkpoint, write_error, write_file
from fedml_progfed.runners.federation import Federation, build_federation
from fedml_progfed.runners.recorder import RunRecorder
from fedml_progfed.runners.run_dir import check_same_config, prepare_out, write_config
from fedml_progfed.runners.standalone import run_with_progress

log = logging.getLogger("fedml_progfed")

BASELINE = "e2e"
#: ExclusiveFL: end-to-end under the memory budgets (only clients that fit the full model train).
EXCLUSIVE = "e2e-exclusive"
DEFAULT_METHODS = ("progfed", "e2e")


def _train_and_write(
    config: RunConfig, sections: dict, out: Path, label: str, show_progress: bool, data=None, resume: bool = False
) -> tuple[list[dict], dict[str, Any]]:
    """One standalone run into ``out`` (a prepared folder), or its continuation from a checkpoint."""
    if resume:
        check_same_config(out, sections)
        checkpoint = latest_checkpoint(out)
    fed = build_federation(config, sections, data)
    recorder = RunRecorder(out, config, fed.trainer.client)
    if resume:
        recorder.restore(fed.server, checkpoint)
        log.info("%s: resuming from %s (%d rounds done)", label, checkpoint, fed.server.state.round)
    else:
        write_config(out, sections)
    recorder.start(fed.server)
    fed.server.round_hooks.append(recorder)
    log.info(
        "%s: %s, %d stages, %s, %d clients (%d per round), %d rounds on %s",
        label, config.model, fed.server.model.num_stages, describe_plan(fed), config.client_num_in_total,
        config.client_num_per_round, fed.total_rounds, fed.device,
    )
    rows = run_with_progress(fed, label, show_progress)
    summary = write_results(out, sections, fed, label, runtime="standalone")
    return rows, summary


def describe_plan(fed: Federation) -> str:
    """The algorithm's schedule in one line for logs (ProgFed: stages and rounds)."""
    schedule = getattr(fed.server.algorithm, "schedule", None)
    return f"schedule {schedule.describe()}" if schedule is not None else fed.server.algorithm.name


def write_results(
    out: Path, sections: dict, fed: Federation, label: str, runtime: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run folder from the aggregator's ledger; the same for every runtime.

    ``summary.json`` saying ``complete`` is written after the model, the ledger and the
    step plots, so a folder whose writing failed is never taken for a finished run.

    Raises
    ------
    WriteError
        A file could not be written (full disk, no permission, read-only or lost mount):
        one line naming it and the final checkpoint ``--resume`` writes the results from.
    """
    try:
        return _write_results(out, sections, fed, label, runtime, extra)
    except OSError as exc:
        _withdraw_complete_summary(out / "summary.json")
        raise write_error(out, exc, fed.total_rounds) from None


def _write_results(
    out: Path, sections: dict, fed: Federation, label: str, runtime: str, extra: dict[str, Any] | None
) -> dict[str, Any]:
    """:func:`write_results` but for the error: the model first, the summary last."""
    config = fed.config
    ledger = fed.server.state.ledger
    memory = fed.server.memory.summary()
    # The final global model (the algorithm's final architecture), without pickle, all of it or none.
    final = fed.server.algorithm.final_state(fed.server.model)
    write_file(out / "model.safetensors", save({k: v.detach().cpu().contiguous() for k, v in final.items()}))
    write_summary_json(out / "ledger.json", {"totals": ledger.totals(), "per_client": ledger.per_client()})
    if any(not is_missing(row.get("em")) for row in ledger.rows):
        plot_effective_movement(ledger.rows, config.profl.em_threshold, out)
    plot_memory(memory["steps"], memory.get("budgets_bytes", {}).get("all"), out)
    return write_run_folder(out, sections, ledger.rows, _summary_extra(fed, label, runtime, extra, memory), title=label)


def _summary_extra(
    fed: Federation, label: str, runtime: str, extra: dict[str, Any] | None, memory: dict[str, Any]
) -> dict[str, Any]:
    """What ``summary.json`` holds beyond the ledger's rows."""
    config = fed.config
    ledger = fed.server.state.ledger
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
    extra.update(more)
    extra["ledger"] = ledger.totals()
    # a skipped or silent client was sent the round and trained nothing
    extra["clients_trained"] = len({c["client"] for c in ledger.per_client() if not (c.get("skipped") or c.get("silent"))})
    extra["memory"] = memory["steps"]
    if "budgets_bytes" in memory:
        extra["memory_budgets_bytes"] = memory["budgets_bytes"]
    privacy = fed.server.state.privacy or fed.server.state.record_privacy
    if privacy is not None:
        extra["privacy"] = privacy.summary()  # the final (epsilon, delta) and the accountant
    if fed.server.changes is not None:
        extra["references_peak_mb"] = fed.server.changes.references.peak_bytes / 1e6
    extra["algorithm_state"] = fed.server.state.algorithm_summary()  # e.g. ProFL's steps: rounds, freeze reasons
    extra["complete"] = fed.server.finished
    return extra


def _withdraw_complete_summary(path: Path) -> None:
    """Remove a ``summary.json`` that says complete: beside missing results, ``compare --resume`` would read it back."""
    try:
        if json.loads(path.read_text()).get("complete"):
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass  # none, unreadable, or a read-only folder: nothing to withdraw, or nothing can be


def run_experiment(
    cf: str, overrides: Sequence[str], out: Path, show_progress: bool = True, overwrite: bool = False, resume: bool = False
) -> dict[str, Any]:
    """Train the configuration as given (or continue it) and write its results folder; returns the summary."""
    sections, config = load_config(cf, overrides)
    prepare_out(out, overwrite=overwrite, resume=resume)
    _, summary = _train_and_write(config, sections, out, config.progfed.strategy, show_progress, resume=resume)
    return summary


TARGET_FRACTIONS = (0.5, 0.8, 0.9, 0.98, 0.99, 0.9995, 1.0)


def run_comparison(
    cf: str,
    overrides: Sequence[str],
    out: Path,
    show_progress: bool = True,
    variants: Sequence[str] | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    overwrite: bool = False,
    resume: bool = False,
) -> str:
    """Each method for each uplink compression variant, on identical seeds, data and sampling.

    ``methods`` are algorithm names (``e2e``, ``progfed``, ``profl``, ``allsmall``,
    ``heterofl``, ``depthfl``), ProgFed's update strategies, or ``e2e-exclusive``
    (ExclusiveFL: end-to-end under the memory budgets, only the clients that fit the full
    model train). ``e2e`` always runs without budgets (the upper bound); every other method
    runs under the configuration's budgets. Costs are compared with ``e2e-exclusive`` when it
    runs, else with ``e2e``. Writes a run folder per run
    (``out/<method>-<variant>``), ``out/comparison.json`` (``runs`` and
    ``cost_to_target`` against the e2e run of the float variant, or the first
    variant's), ``out/comparison.txt`` and comparison plots; returns the printed table.
    Every run is built first, reading no data (:func:`check_runs`): a method that cannot
    start ends the comparison before any trains.
    """
    sections, config = load_config(cf, overrides)
    variants = list(variants) if variants else [config.progfed.compression_up]
    methods = list(methods)
    unknown = [m for m in methods if m not in ALGORITHMS and m not in UPDATE_RULES and m != EXCLUSIVE]
    if unknown:
        raise ConfigError(
            f"--methods: unknown {unknown[0]!r}; available: {', '.join(ALGORITHMS.names())}, {EXCLUSIVE} and "
            f"ProgFed's update strategies {', '.join(UPDATE_RULES.names())}"
        )
    baseline_method = EXCLUSIVE if EXCLUSIVE in methods else BASELINE
    if baseline_method not in methods:
        raise ConfigError(f"--methods: {', '.join(methods)} lacks a baseline every cost is compared with: "
                          f"add {BASELINE} (no budgets) or {EXCLUSIVE} (under the budgets)")
    if EXCLUSIVE in methods and not config.memory.budgets:
        raise ConfigError(f"--methods: {EXCLUSIVE} trains end to end under the memory budgets, and the config sets "
                          f"none; set memory_args.memory_budgets or use {BASELINE}")
    planned = [_planned_run(cf, overrides, config, method, variant) for variant in variants for method in methods]
    check_runs(planned)
    prepare_out(out, overwrite=overwrite, resume=resume)
    data = load_federated_data(config)  # loaded once: every run sees the very same partition
    runs: dict[str, list[dict]] = {}
    records = []
    for run in planned:
        rows, summary = _run_in_comparison(run.config, run.sections, out / run.name, run.name, show_progress, data, resume)
        runs[run.name] = rows
        records.append({"method": run.method, "variant": run.variant, "name": run.name, **_record(summary, rows, config)})
    baseline = f"{baseline_method}-float" if "float" in variants else f"{baseline_method}-{variants[0]}"
    cost = {
        name: compare_runs(runs[baseline], rows, TARGET_FRACTIONS) for name, rows in runs.items() if name != baseline
    }
    memory = {r["name"]: r for r in records}
    table = format_comparison_table(runs, baseline=baseline, memory=memory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.txt").write_text(table + "\n")
    write_summary_json(out / "comparison.json", {"baseline": baseline, "runs": records, "cost_to_target": cost})
    plot_comparison(runs, out)
    return table


@dataclass(frozen=True)
class PlannedRun:
    """One run of a comparison: a method under an uplink variant, its loaded config and folder name."""

    method: str
    variant: str
    sections: dict
    config: RunConfig

    @property
    def name(self) -> str:
        return f"{self.method}-{self.variant}"


def _planned_run(cf: str, overrides: Sequence[str], config: RunConfig, method: str, variant: str) -> PlannedRun:
    """The config of ``method`` under ``variant`` (loading it checks its keys and values)."""
    extra = [*_strategy(method, config), f"progfed_args.progfed_compression_up={variant}"]
    sections, run_config = _e2e(cf, overrides, extra) if method in (BASELINE, EXCLUSIVE) \
        else load_config(cf, [*overrides, *extra])
    return PlannedRun(method, variant, sections, run_config)


def check_runs(planned: Sequence[PlannedRun]) -> None:
    """Build every run as it would start (the dry run's set-up, no data read) before any trains.

    Else a method whose set-up fails (a ProFL step cap that does not fit ``comm_round``, a
    codec that does not exist) would end the comparison only after the others trained.

    Raises
    ------
    ProgFedError
        The first run's start-up error, as that run would print it.
    """
    from fedml_progfed.runners.dry_run import build_without_data

    for run in planned:
        build_without_data(run.config, run.sections)  # built and dropped: only its refusal matters here


def _strategy(method: str, config: RunConfig) -> list[str]:
    """The overrides that make a run of ``method``."""
    if method == EXCLUSIVE:
        return [f"progfed_args.progfed_strategy={BASELINE}"]
    if method == BASELINE:  # the upper bound: every client trains the full model
        return [f"progfed_args.progfed_strategy={BASELINE}"] + (["memory_args.memory_budgets=null"]
                                                                 if config.memory.budgets else [])
    if method in ALGORITHMS:
        return [f"progfed_args.progfed_strategy={method}"]
    # a Table 6 update strategy is ProgFed with progfed_update set
    return ["progfed_args.progfed_strategy=progfed", f"progfed_args.progfed_update={method}"]


def _run_in_comparison(config, sections, out: Path, name: str, show_progress: bool, data, resume: bool):
    """One run of a comparison; with ``--resume``, a finished run is read back and an interrupted one continued."""
    summary_path = out / "summary.json"
    if resume and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("complete"):
            check_same_config(out, sections)
            log.info("%s: complete, read back from %s", name, out)
            return read_metrics_csv(out / "metrics.csv"), summary
    started = resume and bool(complete_checkpoints(out))
    if not started:
        prepare_out(out, overwrite=True)
    return _train_and_write(config, sections, out, name, show_progress, data, resume=started)


def _record(summary: dict[str, Any], rows: list[dict], config: RunConfig) -> dict[str, Any]:
    """One run's line of comparison.json: costs, metrics, peak memory and who could train."""
    shares = [r["eligible_clients"] / config.client_num_in_total for r in rows if not is_missing(r.get("eligible_clients"))]
    per_step: dict[str, float] = {}
    for row in rows:
        key = f"{row['phase']} {row['block']}" if row.get("phase") else f"stage {row['stage']}"
        if not is_missing(row.get("objective")) and row.get("objective") == "mse":
            key += " (distil B)"
        per_step.setdefault(key, row["eligible_clients"] / config.client_num_in_total)
    return {
        "total_bytes_up": summary["total_bytes_up"],
        "total_bytes_down": summary["total_bytes_down"],
        "total_flops": summary["total_flops"],
        "final_metric": summary["final_metric"],
        "best_metric": summary["best_metric"],
        "wall_s": summary["wall_s"],
        "peak_mem_mb": max((r["peak_mem_mb"] for r in rows if not is_missing(r.get("peak_mem_mb"))), default=None),
        "eligible_share_min": min(shares, default=None),
        "eligible_share_max": max(shares, default=None),
        "eligible_share_per_step": per_step,
        "clients_trained": summary["clients_trained"],
    }


def _e2e(cf: str, overrides: Sequence[str], extra: Sequence[str]):
    """The baseline's config: a ProgFed schedule has no meaning for e2e, so it is dropped."""
    sections, _ = load_config(cf, overrides)
    sections = apply_overrides(sections, extra)
    sections.get("progfed_args", {}).pop("progfed_schedule", None)
    return sections, RunConfig.from_flat(flatten(sections))
