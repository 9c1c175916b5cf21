"""``describe``: per-stage size and cost of a staged model and its schedule, without data or training.

The two-way communication of a run is counted round by round from the same
plans and layouts the engine uses: a round sends the active sub-model down to
each client and the uploaded names back up (all active parameters, or only the
entering block and head in a warm-up round). The ratio against end-to-end
training is ``Σ_r (down_r + up_r) / (2 T P_S)`` where ``P_S`` is the full
model's parameter count (ProgFed Sec. 4.3, Table 3); without warm-up it is
``Σ_s T_s P_s / (T P_S)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fedml_progfed.algorithms import training_settings
from fedml_progfed.algorithms.base import Assignment, RoundPlan
from fedml_progfed.algorithms.progfed import ProgFed
from fedml_progfed.config.schema import RunConfig
from fedml_progfed.core.flops import forward_flops, train_flops
from fedml_progfed.core.staged_model import StagedModel, count_parameters, initialize
from fedml_progfed.models import build_model
from fedml_progfed.privacy import PrivacySettings


class _EnergyTask:
    """Any scalar loss gives the same counted FLOPs (the counter counts convolutions and matrix
    products, not the loss), so one loss serves classifiers and U-Nets alike without labels."""

    name = metric_name = "energy"

    def loss(self, output: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
        return output.float().pow(2).mean()


def communication(model: StagedModel, algorithm: ProgFed) -> dict[str, Any]:
    """Parameters sent down and up over the whole run, from the algorithm's plans and layouts."""
    params = {n: p.numel() for n, p in model.named_parameters()}
    down = up = 0
    for round_idx in range(algorithm.total_rounds):
        layout = algorithm.layout(model, algorithm.plan_for_round(round_idx))
        down += sum(params[n] for n in layout.active if n in params)
        up += sum(params[n] for n in layout.upload if n in params)
    full = count_parameters(model, model.num_stages)
    training_rounds = algorithm.schedule.training_rounds
    ratio = (down + up) / (2 * training_rounds * full)
    return {"params_down": down, "params_up": up, "comm_ratio_vs_e2e": ratio, "comm_change_vs_e2e": ratio - 1.0}


def describe_model(model_name: str, input_shape: Sequence[int], num_classes: int, config: RunConfig) -> dict[str, Any]:
    """Stage sizes, measured FLOPs per sample, the schedule and the communication ratio vs e2e."""
    model = initialize(
        build_model(model_name, tuple(input_shape), num_classes, config.progfed.stages, **config.model_options()),
        config.random_seed,
    )
    algorithm = ProgFed(config.progfed, training_settings(config), model.num_stages, task=_EnergyTask(),
                        end_to_end=config.progfed.strategy == "e2e")
    sample = torch.zeros(1, *input_shape)
    rows = []
    for stage in range(1, model.num_stages + 1):
        # the round's own set-up and loss: the update strategy decides what runs and what trains;
        # counted on meta tensors: the same counts as on real ones, without computing anything
        # (a full-size 3D U-Net would take minutes on a CPU)
        plan = RoundPlan(round=0, stage=stage, lr=0.0)
        probe = algorithm.memory_probe(model, Assignment(plan, algorithm.layout(model, plan)))
        rows.append({
            "stage": stage,
            "params": count_parameters(model, stage),
            "flops_per_sample": train_flops(model, probe.prepare, probe.objective, sample, sample, device="meta"),
            "forward_flops_per_sample": forward_flops(
                model, lambda m, s=stage: setattr(m, "stage", s), sample, device="meta"
            ),
        })
    return {
        "model": model_name,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "strategy": config.progfed.strategy,
        "update": algorithm.update,
        "options": config.model_options(),
        "stages": rows,
        "full_params": count_parameters(model, model.num_stages),
        "schedule": algorithm.schedule.describe(),
        "warmup_mode": config.progfed.warmup_mode,
        "total_rounds": algorithm.total_rounds,
        **communication(model, algorithm),
    }


def format_description(info: dict[str, Any]) -> str:
    """Human-readable form of :func:`describe_model`'s result."""
    options = "".join(f"  {k} {v}" for k, v in info.get("options", {}).items())
    lines = [
        f"model {info['model']}{options}  input {tuple(info['input_shape'])}  classes {info['num_classes']}  "
        f"full parameters {info['full_params']:,}",
        f"{'stage':>5} {'params':>14} {'train FLOPs/sample':>20} {'fwd FLOPs/sample':>18} {'rounds':>8}",
    ]
    rounds: dict[int, int] = {}
    for phase in info["schedule"]:
        rounds[phase["stage"]] = rounds.get(phase["stage"], 0) + phase["rounds"]
    for row in info["stages"]:
        lines.append(
            f"{row['stage']:>5} {row['params']:>14,} {row['flops_per_sample']:>20,} "
            f"{row['forward_flops_per_sample']:>18,} {rounds.get(row['stage'], 0):>8}"
        )
    phases = []
    for p in info["schedule"]:
        warmup = f" ({p['warmup']} warm-up, {info['warmup_mode']})" if p["warmup"] else ""
        phases.append(f"stage {p['stage']}: rounds {p['start']}-{p['start'] + p['rounds'] - 1}{warmup}")
    update = "" if info.get("update", "progressive") == "progressive" else f", update {info['update']}"
    lines.append(f"schedule ({info['strategy']}{update}, {info['total_rounds']} rounds): {', '.join(phases)}")
    lines.append(
        f"two-way communication vs end-to-end: ratio {info['comm_ratio_vs_e2e']:.4f} "
        f"({100 * info['comm_change_vs_e2e']:+.2f} %)"
    )
    return "\n".join(lines)


def describe_profl(
    model_name: str, input_shape: Sequence[int], num_classes: int, config: RunConfig, batch_size: int, measure: bool
) -> dict[str, Any]:
    """ProFL's steps with their trainable and total parameters and the memory of one local step."""
    from fedml_progfed.algorithms.base import RoundPlan
    from fedml_progfed.algorithms.profl import ProFL
    from fedml_progfed.core.memory import measure_step
    from fedml_progfed.core.staged_model import names_under
    from fedml_progfed.tasks.classification import ClassificationTask

    task = ClassificationTask()
    model = initialize(
        build_model(model_name, tuple(input_shape), num_classes, config.progfed.stages, **config.model_options()),
        config.random_seed,
    )
    # the steps and their memory do not depend on the round budget
    long_run = config.replace(comm_round=max(config.comm_round, 100_000))
    algorithm = ProFL(long_run.profl, training_settings(long_run), model.num_stages, task)
    algorithm.prepare_model(model)
    x, y = task.example_batch(tuple(input_shape), num_classes, batch_size)
    params = dict(model.named_parameters())

    def count(modules) -> int:
        return sum(params[n].numel() for n in names_under(model, modules) if n in params)

    def memory(probe) -> dict[str, Any]:
        report = measure_step(model, probe.prepare, probe.keep_modules, probe.objective, x, y,
                              config.momentum, key=probe.key, measure=measure)
        return {"estimated_bytes": report.estimated_bytes, "measured_bytes": report.measured_bytes or None,
                "method": report.method}

    full = memory(algorithm.full_model_probe(model))
    steps = []
    for index, step in enumerate(algorithm.steps):
        plan = RoundPlan(round=0, stage=model.num_stages, lr=0.0, details={"step": index})
        steps.append({"step": index, "label": step.label, "trainable_params": count(step.trained),
                      "total_params": count(step.modules),
                      **memory(algorithm.memory_probe(model, Assignment(plan, algorithm.layout(model, plan))))})
    return {"model": model_name, "input_shape": list(input_shape), "num_classes": num_classes, "strategy": "profl",
            "batch_size": batch_size, "full_model": {"params": count(model.stage_modules(model.num_stages)), **full},
            "steps": steps}


def format_profl(info: dict[str, Any]) -> str:
    """Human-readable form of :func:`describe_profl`'s result."""
    full = info["full_model"]
    mb = lambda b: "-" if not b else f"{b / 1e6:,.1f}"  # noqa: E731
    lines = [
        f"ProFL steps of {info['model']}  input {tuple(info['input_shape'])}  classes {info['num_classes']}  "
        f"batch {info['batch_size']}",
        f"{'step':<22} {'trainable':>12} {'total':>12} {'est. MB':>9} {'measured MB':>12} {'vs full':>8}",
    ]
    reference = full["measured_bytes"] or full["estimated_bytes"]
    for row in [*info["steps"], {"label": "full model (e2e)", "trainable_params": full["params"], "total_params": full["params"], **full}]:
        own = row["measured_bytes"] or row["estimated_bytes"]
        lines.append(
            f"{row['label']:<22} {row['trainable_params']:>12,} {row['total_params']:>12,} {mb(row['estimated_bytes']):>9} "
            f"{mb(row['measured_bytes']):>12} {own / reference:>8.3f}"
        )
    lines.append("vs full: measured peak against the full model's (analytic estimates without --measure)")
    return "\n".join(lines)


def describe_privacy(config: RunConfig, rounds: int) -> dict[str, Any] | None:
    """The epsilon the configured schedule spends before any training (client-level DP), or ``None``.

    Every client is taken as eligible every round; memory budgets that leave fewer eligible
    raise a round's sampling rate, so a run with budgets can only spend more (it accounts
    each round's own eligible set, and never passes a target).
    """
    settings = PrivacySettings.from_config(config)
    if settings is None or config.dp_solution_type != "client":  # record-level epsilon depends on each silo's size
        return None
    population = config.client_num_in_total
    info: dict[str, Any] = {
        "rounds": rounds, "epsilon": settings.planned_epsilon(rounds, population), "delta": settings.delta,
        "accountant": settings.new_accountant().describe(), "clip": settings.clip,
        "noise_multiplier": settings.noise_multiplier, "target_epsilon": settings.target_epsilon,
        "budgets": config.memory.budgets is not None,
    }
    if settings.target_epsilon is not None:
        info["largest_rounds"] = settings.largest_rounds(population, settings.target_epsilon)
    return info


def format_privacy(info: dict[str, Any]) -> str:
    """One line of :func:`describe_privacy`'s result (two with a target)."""
    line = (f"client-level DP: {info['rounds']} rounds spend epsilon {info['epsilon']:.3f} at delta {info['delta']:g} "
            f"(C {info['clip']:g}, z {info['noise_multiplier']:g}; {info['accountant']})")
    if info["budgets"]:
        line += "; memory budgets can only raise it (each round is charged its eligible set)"
    if info["target_epsilon"] is not None:
        line += f"\ntarget epsilon {info['target_epsilon']:g}: at most {info['largest_rounds']} rounds fit"
    return line
