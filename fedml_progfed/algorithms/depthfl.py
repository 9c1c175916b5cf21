"""DepthFL (Kim, Kim, Kim, Ha, ICLR 2023): each client trains the deepest prefix of blocks its memory fits.

The staged model's blocks ``E_1..E_S`` and heads ``G_1..G_S`` are DepthFL's depths and
classifiers: a client of depth ``d`` trains ``E_1..E_d`` with a classifier on every depth,
``G_1..G_d``. A round, as this module implements it:

1. **plan** (server): one plan per depth, deepest first (:meth:`DepthFL.variants`); the
   engine gives each client the deepest its memory budget fits, measured with the same
   probe as every method, and samples the round's clients among those that fit one.
2. **layout**: a depth-``d`` client receives, trains and uploads ``E_1..E_d`` and
   ``G_1..G_d`` (every tensor of its prefix; nothing is frozen).
3. **objective** (Sec. 3.2): the sum over the client's classifiers of the cross-entropy
   with the labels, plus, with ``depthfl_self_distill``, mutual self-distillation: each
   classifier's KL divergence from every other classifier's (detached) prediction,
   averaged over the others. Without it the method is InclusiveFL-like (each depth learns
   from the labels alone).
4. **server_update** (Sec. 3.1): each tensor is the mean over the clients that trained it;
   a block no client of the round reached keeps its value.
5. **scored**: the deepest classifier any client has trained (``G_S o E_S o ... o E_1`` once
   a client reaches the full depth; column ``scored_depth``); the ensemble of the classifiers
   up to it (mean of their softmax, Sec. 3.3) is the column ``test_metric_ensemble``.

Without memory budgets every client trains the full depth, with deep supervision.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedml_progfed.algorithms.base import (
    Algorithm, ClientUpdate, Layout, Objective, RoundPlan, ServerState, StageView, TrainingSettings, Untrainable,
    merge_covered,
)
from fedml_progfed.config.schema import DepthFLConfig
from fedml_progfed.core.schedule import Schedule
from fedml_progfed.core.server_optim import build_server_optimizer
from fedml_progfed.core.staged_model import SequentialStagedModel, StagedModel, names_under, parameter_names
from fedml_progfed.errors import FieldError
from fedml_progfed.tasks.base import Task


def prefix_logits(model: SequentialStagedModel, x: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """Every classifier's logits of the prefix ``E_1..E_depth``, in one forward pass (Sec. 3.1)."""
    outputs = []
    for index in range(depth):
        x = model.blocks[index](x)
        outputs.append(model.heads[index](x))
    return outputs


def mutual_distillation(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i 1/(k-1) sum_{j != i} KL(p_j || p_i)`` with the teachers ``p_j`` detached (Sec. 3.2)."""
    k = len(logits)
    log_probs = [F.log_softmax(z, dim=1) for z in logits]
    teachers = [F.softmax(z.detach(), dim=1) for z in logits]
    total = logits[0].new_zeros(())
    for i in range(k):
        for j in range(k):
            if i != j:
                total = total + F.kl_div(log_probs[i], teachers[j], reduction="batchmean") / (k - 1)
    return total


class Ensemble(nn.Module):
    """The mean of the softmax of the classifiers ``G_1..G_depth`` (DepthFL Sec. 3.3); its log as logits."""

    def __init__(self, model: SequentialStagedModel, depth: int) -> None:
        super().__init__()
        self.model = model
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = prefix_logits(self.model, x, self.depth)
        return torch.stack([F.softmax(z, dim=1) for z in outputs]).mean(0).clamp_min(1e-12).log()


@dataclass
class DepthFLState:
    """The deepest depth any client has trained so far: deeper classifiers are still at their initial weights."""

    deepest: int = 0

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"deepest": self.deepest}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.deepest = int(meta["deepest"])


class DepthFL(Algorithm):
    """DepthFL over a feed-forward staged model (see the module docstring).

    Parameters
    ----------
    settings
        DepthFL's section (``depthfl_self_distill``).
    training
        The shared training settings (rounds, SGD, learning-rate decay, server step).
    num_stages
        ``S``: the depths are ``1..S``.
    task
        Loss and metric (classification: the KL term needs class logits).
    """

    name = "depthfl"

    def __init__(self, settings: DepthFLConfig, training: TrainingSettings, num_stages: int, task: Task) -> None:
        self.settings = settings
        self.training = training
        self.task = task
        self.num_stages = num_stages
        self.schedule = Schedule.end_to_end(training.rounds, num_stages, lr=training.sgd.lr,
                                            lr_schedule=training.lr_schedule, lr_min=training.lr_min)
        self.total_rounds = self.schedule.total_rounds

    def prepare_model(self, model: StagedModel) -> None:
        if not isinstance(model, SequentialStagedModel):
            raise FieldError("model", f"depthfl needs a feed-forward model with a classifier per block; "
                                      f"{type(model).__name__} has none (use convnet, resnet18, resnet34_small or vgg16)")

    def init_state(self, model: StagedModel) -> ServerState:
        model.stage = model.num_stages
        self.trained = DepthFLState()
        return ServerState(model, build_server_optimizer(self.training.server), self.trained)

    def start_round(self, state: ServerState, untrainable: Untrainable) -> RoundPlan:
        lr = self.schedule.at(state.round).lr if state.round < self.total_rounds else 0.0
        return RoundPlan(round=state.round, stage=state.model.num_stages, lr=lr)

    def variants(self, model: StagedModel, plan: RoundPlan) -> tuple[RoundPlan, ...]:
        """One plan per depth, deepest first: each client trains the deepest its memory fits."""
        return tuple(replace(plan, stage=depth) for depth in range(model.num_stages, 0, -1))

    def layout(self, model: StagedModel, plan: RoundPlan) -> Layout:
        depth = model.check_stage(plan.stage)
        modules = (*(f"blocks.{i}" for i in range(depth)), *(f"heads.{i}" for i in range(depth)))
        active = tuple(names_under(model, modules))
        params = parameter_names(model)
        return Layout(label=f"depth {depth}", modules=modules, active=active,
                      trainable=tuple(n for n in active if n in params), upload=active)

    def objective(self, model: StagedModel, plan: RoundPlan) -> Objective:
        depth, distill = plan.stage, self.settings.self_distill and plan.stage > 1

        def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            outputs = prefix_logits(m, x, depth)
            total = sum(self.task.loss(z, y) for z in outputs)
            return total + mutual_distillation(outputs) if distill else total

        return loss

    def server_update(self, state: ServerState, plan: RoundPlan, layout: Layout, updates: Sequence[ClientUpdate]) -> None:
        """Each tensor: the mean over the clients whose depth reached it (Sec. 3.1)."""
        merge_covered(state, layout.upload, updates)
        reached = [depth for depth in range(1, state.model.num_stages + 1)
                   if any(n.startswith(f"heads.{depth - 1}.") for u in updates for n in u.deltas)]
        state.algorithm.deepest = max([state.algorithm.deepest, *reached])

    def _scored_depth(self, model: StagedModel) -> int:
        """The deepest classifier trained so far (every depth if none was yet): a memory budget may keep
        every client from the full depth, and an untrained classifier says nothing about the method."""
        deepest = self.trained.deepest if hasattr(self, "trained") else 0
        return deepest or model.num_stages

    def scored(self, model: StagedModel, plan: RoundPlan) -> nn.Module:
        return StageView(model, self._scored_depth(model))

    def extra_scored(self, model: StagedModel, plan: RoundPlan) -> Mapping[str, nn.Module]:
        return {"ensemble": Ensemble(model, self._scored_depth(model))}

    def report(self, state: ServerState, plan: RoundPlan, batch) -> dict[str, Any]:
        return {**super().report(state, plan, batch), "scored_depth": self._scored_depth(state.model)}
