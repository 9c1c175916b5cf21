"""HeteroFL (Diao, Ding, Tarokh, ICLR 2021): width-nested sub-models, each client the widest its memory fits.

A sub-model of width ratio ``r`` keeps the first ``ceil(r * w)`` channels of every hidden
layer of width ``w``, so its tensors are leading slices of the global ones (Sec. 3). A round,
as this module implements it:

1. **plan** (server): one plan per ratio of ``width_ratios`` (1, 1/2, 1/4, 1/8, 1/16 by
   default, the paper's levels a-e), widest first (:meth:`HeteroFL.variants`); the engine
   gives each client the widest its memory budget fits, measured on that width's own copy
   with the probe every method uses, and samples the round's clients among those that fit.
2. **layout**: the whole depth at the client's width: every tensor travels, trains and
   returns as its leading slice (the layout's ``narrow`` shapes).
3. **objective**: the cross-entropy of the narrow model, with the scaler (Sec. 3.2: hidden
   outputs divided by ``r`` in training; ``width_scaler: auto`` puts it on models with
   normalisation layers, as all the paper's are, and leaves it off the ConvNets, where it
   makes local SGD diverge) and static batch norm (no running statistics on any party).
4. **server_update** (Sec. 3.1): every element is the mean over the clients whose slice
   covers it; a slice only one client trained takes that client's value, and an element
   nobody trained keeps its value.
5. **scored**: the full-width model; each narrower width's global model (the slices of the
   global model at that ratio) is the column ``test_metric_w<ratio>``, as the paper reports.

Static batch norm here: every BatchNorm layer normalises with the statistics of the batch it
sees, in training and at test. The paper's sBN instead queries the clients for global
statistics once training ends; this package's models with the ``width`` capability use
group norm (ResNets) or no normalisation (ConvNets) except VGG, where the two differ.
Without memory budgets every client trains the full width (FedAvg).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

from torch import nn

from fedml_progfed.algorithms.base import (
    Algorithm, ClientUpdate, Layout, Objective, RoundPlan, ServerState, TrainingSettings, Untrainable, merge_covered,
)
from fedml_progfed.algorithms.narrow import (
    check_width_model, narrow_model, scaler_applies, width_layout, width_of, width_view,
)
from fedml_progfed.config.schema import WidthConfig
from fedml_progfed.core.schedule import Schedule
from fedml_progfed.core.server_optim import build_server_optimizer
from fedml_progfed.core.staged_model import StagedModel
from fedml_progfed.core.width import static_batch_norm
from fedml_progfed.tasks.base import Task


class HeteroFL(Algorithm):
    """HeteroFL over a staged model whose widths scale (see the module docstring).

    Parameters
    ----------
    settings
        The width section (``width_ratios``, ``width_scaler``).
    training
        The shared training settings (rounds, SGD, learning-rate decay, server step).
    num_stages
        ``S``: every width trains the whole depth, ``M^S``.
    task
        Loss and metric.
    """

    name = "heterofl"

    def __init__(self, settings: WidthConfig, training: TrainingSettings, num_stages: int, task: Task) -> None:
        self.settings = settings
        self.training = training
        self.task = task
        self.schedule = Schedule.end_to_end(training.rounds, num_stages, lr=training.sgd.lr,
                                            lr_schedule=training.lr_schedule, lr_min=training.lr_min)
        self.total_rounds = self.schedule.total_rounds

    def prepare_model(self, model: StagedModel) -> None:
        check_width_model(model, self.name)
        static_batch_norm(model)  # on every party, so the state-dict keys agree

    def init_state(self, model: StagedModel) -> ServerState:
        model.stage = model.num_stages
        return ServerState(model, build_server_optimizer(self.training.server))

    def start_round(self, state: ServerState, untrainable: Untrainable) -> RoundPlan:
        lr = self.schedule.at(state.round).lr if state.round < self.total_rounds else 0.0
        return RoundPlan(round=state.round, stage=state.model.num_stages, lr=lr,
                         details={"width": self.settings.ratios[0]})

    def variants(self, model: StagedModel, plan: RoundPlan) -> tuple[RoundPlan, ...]:
        """One plan per width ratio, widest first: each client trains the widest its memory fits."""
        return tuple(replace(plan, details={"width": ratio}) for ratio in self.settings.ratios)

    def client_model(self, model: StagedModel, plan: RoundPlan) -> StagedModel:
        return narrow_model(model, width_of(plan), scaler_applies(model, self.settings.scaler))

    def layout(self, model: StagedModel, plan: RoundPlan) -> Layout:
        return width_layout(model, plan, self.client_model(model, plan))

    def objective(self, model: StagedModel, plan: RoundPlan) -> Objective:
        return lambda m, x, y: self.task.loss(m.forward_stage(x, m.num_stages), y)

    def server_update(self, state: ServerState, plan: RoundPlan, layout: Layout, updates: Sequence[ClientUpdate]) -> None:
        """Each element: the mean over the clients whose slice covers it (Sec. 3.1)."""
        merge_covered(state, layout.upload, updates)

    def scored(self, model: StagedModel, plan: RoundPlan) -> nn.Module:
        return width_view(model, 1.0, self.layout(model, plan))

    def extra_scored(self, model: StagedModel, plan: RoundPlan) -> Mapping[str, nn.Module]:
        """Each narrower width's global model, as the paper reports them."""
        views = {}
        for ratio in self.settings.ratios:
            if ratio != 1.0:
                width_plan = replace(plan, details={"width": ratio})
                views[f"w{ratio:g}"] = width_view(model, ratio, self.layout(model, width_plan))
        return views
