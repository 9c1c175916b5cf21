"""``describe``: per-stage size and cost of a staged model and its schedule, without data or training.

The analytic two-way communication ratio of ProgFed against end-to-end training
is ``Σ_s T_s P_s / (T P_S) − 1`` where ``P_s`` is the number of parameters of
``M^s`` (both directions carry the active sub-model every round; ProgFed Sec. 4.3,
Table 3).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fedml_progfed.config import RunConfig
from fedml_progfed.core.schedule import schedule_for
from fedml_progfed.core.flops import forward_flops, train_flops
from fedml_progfed.core.staged_model import count_parameters, initialize
from fedml_progfed.models import build_model


def _output_energy(output: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
    # Any scalar loss gives the same counted FLOPs (the counter counts convolutions and
    # matrix products, not the loss), so one loss serves classifiers and U-Nets alike.
    return output.float().pow(2).mean()


def describe_model(
    model_name: str, input_shape: Sequence[int], num_classes: int, config: RunConfig
) -> dict[str, Any]:
    """Stage sizes, measured FLOPs per sample, the schedule and the analytic communication ratio."""
    stages = config.progfed.stages
    model = initialize(
        build_model(model_name, tuple(input_shape), num_classes, stages, **config.model_options()), config.random_seed
    )
    schedule = schedule_for(config, model.num_stages)
    sample = torch.zeros(1, *input_shape)
    rows = []
    for stage in range(1, model.num_stages + 1):
        rows.append(
            {
                "stage": stage,
                "params": count_parameters(model, stage),
                "flops_per_sample": train_flops(model, stage, False, sample, sample, _output_energy),
                "forward_flops_per_sample": forward_flops(model, stage, sample),
            }
        )
    params = {row["stage"]: row["params"] for row in rows}
    full = params[model.num_stages]
    progressive = sum(phase.rounds * params[phase.stage] for phase in schedule.phases)
    return {
        "model": model_name,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "strategy": config.progfed.strategy,
        "options": config.model_options(),
        "stages": rows,
        "full_params": full,
        "schedule": [dict(p) for p in schedule.describe()],
        "comm_ratio_vs_e2e": progressive / (schedule.total_rounds * full) - 1.0,
    }


def format_description(info: dict[str, Any]) -> str:
    """Human-readable form of :func:`describe_model`'s result."""
    options = "".join(f"  {k} {v}" for k, v in info.get("options", {}).items())
    lines = [
        f"model {info['model']}{options}  input {tuple(info['input_shape'])}  classes {info['num_classes']}  "
        f"full parameters {info['full_params']:,}",
        f"{'stage':>5} {'params':>14} {'train FLOPs/sample':>20} {'fwd FLOPs/sample':>18} {'rounds':>8}",
    ]
    rounds = {}
    for phase in info["schedule"]:
        rounds[phase["stage"]] = rounds.get(phase["stage"], 0) + phase["rounds"]
    for row in info["stages"]:
        lines.append(
            f"{row['stage']:>5} {row['params']:>14,} {row['flops_per_sample']:>20,} "
            f"{row['forward_flops_per_sample']:>18,} {rounds.get(row['stage'], 0):>8}"
        )
    schedule = ", ".join(f"stage {p['stage']}: rounds {p['start']}-{p['start'] + p['rounds'] - 1}" for p in info["schedule"])
    lines.append(f"schedule ({info['strategy']}): {schedule}")
    lines.append(f"two-way communication vs end-to-end: {100 * info['comm_ratio_vs_e2e']:+.2f} %")
    return "\n".join(lines)
