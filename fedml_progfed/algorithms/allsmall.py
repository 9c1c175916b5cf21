"""AllSmall: every client trains one width-scaled copy of the model, small enough for every client's memory.

The baseline memory-constrained FL papers set against HeteroFL-style methods (HeteroFL Sec. 4;
ProFL Sec. 5): instead of excluding the clients that cannot fit the full model (ExclusiveFL),
shrink the model until all of them can. A round, as this module implements it:

1. **plan** (server): the candidate widths are ``width_ratios`` (widest first); the engine
   measures each width's training step with the probe every method uses and gives every
   client the widest that *every* client's budget fits (``shared_variant``). If even the
   narrowest does not fit everyone, the narrowest trains and the clients it does not fit
   never train (said once in the log).
2. **layout**, **objective**: as HeteroFL's at that one width (leading slices, the scaler,
   static batch norm), so every client trains the same small model.
3. **server_update**: the plain mean of the clients' changes of the small model's slices.
4. **scored**: the small model itself. The run hands over that small model (the original
   architecture's keys at the chosen width), not the untrained remainder of the full one.

Without memory budgets the widest ratio fits everyone: AllSmall is then end-to-end FedAvg.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from fedml_progfed.algorithms.base import (
    ClientUpdate, Layout, RoundPlan, ServerState, TrainingSettings, Untrainable, merge_covered,
)
from fedml_progfed.algorithms.heterofl import HeteroFL
from fedml_progfed.algorithms.narrow import WidthState, width_of, width_view
from fedml_progfed.config.schema import WidthConfig
from fedml_progfed.core.server_optim import build_server_optimizer
from fedml_progfed.core.staged_model import StagedModel
from fedml_progfed.core.width import narrow_shapes, narrow_state
from fedml_progfed.tasks.base import Task


class AllSmall(HeteroFL):
    """One width for everyone: the widest every client fits (see the module docstring).

    Shares HeteroFL's narrow copies, layout and objective; differs in who trains what
    (``shared_variant``), what is scored and what the run hands over.
    """

    name = "allsmall"
    shared_variant = True

    def __init__(self, settings: WidthConfig, training: TrainingSettings, num_stages: int, task: Task) -> None:
        super().__init__(settings, training, num_stages, task)
        self.chosen = WidthState(settings.ratios[0])

    def init_state(self, model: StagedModel) -> ServerState:
        model.stage = model.num_stages
        return ServerState(model, build_server_optimizer(self.training.server), self.chosen)

    def start_round(self, state: ServerState, untrainable: Untrainable) -> RoundPlan:
        plan = super().start_round(state, untrainable)
        # After the last round the final broadcast carries the width the run trained.
        return plan if state.round < self.total_rounds else replace(plan, details={"width": self.chosen.width})

    def server_update(self, state: ServerState, plan: RoundPlan, layout: Layout, updates: Sequence[ClientUpdate]) -> None:
        merge_covered(state, layout.upload, updates)  # every update covers the same slices: the plain mean
        self.chosen.width = width_of(plan)

    def scored(self, model: StagedModel, plan: RoundPlan) -> nn.Module:
        return width_view(model, width_of(plan), self.layout(model, plan))

    def extra_scored(self, model: StagedModel, plan: RoundPlan) -> dict:
        return {}

    def final_state(self, model: StagedModel) -> dict[str, torch.Tensor]:
        """The small model the run trained: the architecture's keys at the chosen width."""
        plan = RoundPlan(round=0, stage=model.num_stages, lr=0.0, details={"width": self.chosen.width})
        return narrow_state(model.state_dict(), narrow_shapes(model, self.client_model(model, plan)))
