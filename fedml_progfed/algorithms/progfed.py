"""ProgFed (Wang et al., ICML 2022): progressive training of a staged model, Alg. 1 end to end.

The network is split into blocks ``E_1..E_S`` with light heads ``G_s``; the
sub-model ``M^s = G_s o E_s o ... o E_1`` is trained for ``T_s`` rounds, then
the model grows (Sec. 3.1). End-to-end training (``e2e``) is the same algorithm
with a single stage, the full model ``M^S``, every round.

A round, as this module implements it:

1. **plan** (server): the schedule gives the round's stage, warm-up flag and
   learning rate (:mod:`fedml_progfed.core.schedule`); the broadcast carries
   them and clients follow.
2. **layout**: the broadcast carries every tensor of ``M^s`` (Alg. 1 line 15,
   ``x^s``); clients train and upload all of them, or during warm-up only the
   entering block and head (Alg. 1 lines 16-18), with the other blocks frozen
   (no gradient, normalisation statistics held, Dropout still active).
3. **client_update**: local SGD on the round's trainable set (FedProx adds its
   proximal term), measured FLOPs per sample times samples (Alg. 1 lines 19-24).
4. **server_update**: the weighted mean of the clients' changes is the
   pseudo-gradient of the server optimizer (FedAvg's ``x + eta Δ``, or FedAdam;
   Sec. 4.4); buffers are averaged.

Growth happens in :meth:`ProgFed.grow`, called from :meth:`ProgFed.start_round`
when a round's plan enters a new stage, before that round's broadcast (Alg. 1
lines 5-15: grow, then send ``x^s``). The server's test after a round therefore
scores the sub-model that round trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from torch import nn

from fedml_progfed.algorithms.base import (
    Algorithm, ClientUpdate, Layout, Objective, RoundPlan, ServerState, StageView, TrainingSettings, Untrainable,
    merge_updates,
)
from fedml_progfed.config.schema import ProgFedConfig
from fedml_progfed.core.registry import Registry
from fedml_progfed.core.schedule import Schedule
from fedml_progfed.core.seeding import derive_seed
from fedml_progfed.core.server_optim import build_server_optimizer
from fedml_progfed.core.staged_model import (
    SequentialStagedModel,
    StagedModel,
    active_names,
    count_parameters,
    grow,
    names_under,
    new_names,
)
from fedml_progfed.errors import FieldError
from fedml_progfed.tasks.base import Task

log = logging.getLogger("fedml_progfed")


@dataclass(frozen=True)
class UpdateRule:
    """What a stage-``s`` round runs, trains and is supervised by (ProgFed Sec. 4.5, Table 6).

    ``supervision(s, S)`` lists (stage whose head supervises, loss weight); ``trained(model, s)``
    the modules that train; ``scored(s, S)`` the stage whose sub-model the server tests.
    """

    supervision: Callable[[int, int], tuple[tuple[int, float], ...]]
    trained: Callable[[StagedModel, int], tuple[str, ...]]
    scored: Callable[[int, int], int]
    random_stage: bool = False


def _head(stage: int) -> str:
    return f"heads.{stage - 1}"


def _blocks(stage: int) -> tuple[str, ...]:
    return tuple(f"blocks.{i}" for i in range(stage))


#: ``progfed_update``: the paper's progressive training and the alternatives of its Table 6.
UPDATE_RULES: Registry[UpdateRule] = Registry("update strategy")
# Ours: M^s = G_s o E_s o ... o E_1 trains and is scored.
UPDATE_RULES.add("progressive", UpdateRule(lambda s, S: ((s, 1.0),), lambda m, s: tuple(m.stage_modules(s)), lambda s, S: s))
# Layerwise: only the latest block E_s (and the last head G_S) learns, the input passes the whole M.
UPDATE_RULES.add("layerwise", UpdateRule(lambda s, S: ((S, 1.0),), lambda m, s: (f"blocks.{s - 1}", _head(m.num_stages)),
                                         lambda s, S: S))
# Partial: E_1..E_s learn with supervision from the last head G_S.
UPDATE_RULES.add("partial", UpdateRule(lambda s, S: ((S, 1.0),), lambda m, s: (*_blocks(s), _head(m.num_stages)),
                                       lambda s, S: S))
# Mixed: partial and ours combined, supervised by both G_s and G_S (the reference code's 0.5/0.5).
UPDATE_RULES.add("mixed", UpdateRule(lambda s, S: ((s, 0.5), (S, 0.5)) if s < S else ((S, 1.0),),
                                     lambda m, s: tuple(dict.fromkeys((*m.stage_modules(s), _head(m.num_stages)))),
                                     lambda s, S: s))
# Random: each round a seeded random sub-model M^s trains; the full model is scored.
UPDATE_RULES.add("random", UpdateRule(lambda s, S: ((s, 1.0),), lambda m, s: tuple(m.stage_modules(s)), lambda s, S: S,
                                      random_stage=True))


class ProgFed(Algorithm):
    """ProgFed's Alg. 1 over a :class:`~fedml_progfed.core.staged_model.StagedModel`.

    Parameters
    ----------
    settings
        ProgFed's own section (stages, schedule, warm-up, update rule, FedProx, ...).
    training
        The shared training settings (rounds, learning rate and its decay, SGD, seed).
    num_stages
        ``S`` of the model being trained.
    task
        Loss (and metric) of the data set.
    end_to_end
        Train the full model every round: the ``e2e`` baseline.
    """

    name = "progfed"

    def __init__(
        self, settings: ProgFedConfig, training: TrainingSettings, num_stages: int, task: Task, end_to_end: bool = False
    ) -> None:
        self.settings = settings
        self.training = training
        self.task = task
        self.end_to_end = end_to_end
        lr_options = dict(
            lr=training.sgd.lr, lr_schedule=training.lr_schedule, lr_min=training.lr_min,
            lr_restart_at_growth=training.lr_restart_at_growth,
        )
        if end_to_end:
            self.schedule = Schedule.end_to_end(training.rounds, num_stages, **lr_options)
        else:
            self.schedule = Schedule.progressive(
                training.rounds, num_stages, settings.schedule, settings.warmup_rounds, settings.warmup_mode, **lr_options
            )
        self.total_rounds = self.schedule.total_rounds
        self.prox_mu = settings.fedprox_mu if settings.optimizer == "fedprox" else 0.0
        self.update = "progressive" if end_to_end else settings.update
        self.rule = UPDATE_RULES.lookup(self.update, "progfed.update")
        if self.update != "progressive" and settings.warmup_rounds:
            raise FieldError("progfed.warmup_rounds", f"warm-up belongs to {{progfed.update}}: progressive; "
                                                      f"{self.update!r} trains its own set from the start")

    # ------------------------------------------------------------------ plan

    def plan_for_round(self, round_idx: int) -> RoundPlan:
        """The plan of ``round_idx``: it depends on the round alone (the schedule is fixed)."""
        spec = self.schedule.at(round_idx)
        stage = spec.stage
        if self.rule.random_stage:
            rng = np.random.default_rng(derive_seed("random-stage", self.training.seed, round_idx))
            stage = int(rng.integers(1, self.schedule.phases[-1].stage + 1))
        return RoundPlan(round=round_idx, stage=stage, lr=spec.lr, warmup=spec.warmup)

    def init_state(self, model: StagedModel) -> ServerState:
        state = ServerState(model, build_server_optimizer(self.training.server))
        model.stage = self.schedule.at(0).stage
        return state

    def start_round(self, state: ServerState, untrainable: Untrainable) -> RoundPlan:
        """The round's plan; at the first round of a stage the global model grows first (Alg. 1 line 5)."""
        if state.round >= self.total_rounds:
            return RoundPlan(round=state.round, stage=state.model.stage, lr=0.0)  # the final broadcast
        plan = self.plan_for_round(state.round)
        if plan.stage == state.model.stage:
            return plan
        if self.update == "progressive":
            self.grow(state, plan.stage)
        else:
            # Table 6's alternatives train modules before their stage (or revisit stages): nothing
            # is re-initialised, only the active stage and the optimizer's survivors change.
            before = set(active_names(state.model, state.model.stage))
            state.model.stage = plan.stage
            state.optimizer.on_growth(before & set(active_names(state.model, plan.stage)))
        return plan

    def _modules(self, model: StagedModel, stage: int) -> tuple[str, ...]:
        """Every module a stage-``stage`` round runs: the sub-models of all supervising heads."""
        stages = [st for st, _ in self.rule.supervision(stage, model.num_stages)]
        return tuple(dict.fromkeys(m for st in stages for m in model.stage_modules(st)))

    def layout(self, model: StagedModel, plan: RoundPlan) -> Layout:
        stage = model.check_stage(plan.stage)
        if self.update != "progressive" and not isinstance(model, SequentialStagedModel):
            raise FieldError("progfed.update", f"{self.update!r} needs a feed-forward model with a head per stage; "
                                               f"use progressive for this model")
        modules = self._modules(model, stage)
        active = tuple(names_under(model, modules))
        if plan.warmup and stage > 1:
            entering = model.new_modules(stage)
            upload = tuple(new_names(model, stage))
            frozen = tuple(m for m in model.stage_modules(stage) if m not in entering)
        else:
            trained = self.rule.trained(model, stage)
            upload = tuple(names_under(model, trained))
            frozen = tuple(m for m in modules if m not in trained)
        upload_set = set(upload)
        trainable = tuple(n for n, _ in model.named_parameters() if n in upload_set)
        growth = plan.round < self.total_rounds and self.schedule.at(plan.round).growth
        entering = tuple(model.new_modules(stage)) if growth else ()
        # With progfed.send_entering false, clients derive the entering modules from the shared seed.
        seeded = entering if not self.settings.send_entering else ()
        return Layout(
            label=f"stage {stage}" + (" warm-up" if plan.warmup else ""), modules=modules, active=active,
            trainable=trainable, upload=upload, frozen_modules=frozen, entering=entering, seeded=seeded,
        )

    # ------------------------------------------------------------------ client

    def objective(self, model: StagedModel, plan: RoundPlan) -> Objective:
        """The loss of a stage-``s`` round: each supervising head's loss, weighted (Table 6)."""
        stage = plan.stage
        supervision = self.rule.supervision(stage, model.num_stages)
        if supervision == ((stage, 1.0),):
            return lambda m, x, y: self.task.loss(m.forward_stage(x, stage), y)
        return lambda m, x, y: sum(w * self.task.loss(m.forward_stage(x, st), y) for st, w in supervision)

    # ------------------------------------------------------------------ server

    def server_update(self, state: ServerState, plan: RoundPlan, layout: Layout, updates: Sequence[ClientUpdate]) -> None:
        """Aggregate (Alg. 1 line 27) and step the server optimizer."""
        merge_updates(state, layout.upload, updates)

    def scored(self, model: StagedModel, plan: RoundPlan) -> nn.Module:
        return StageView(model, self.rule.scored(plan.stage, model.num_stages))

    def report(self, state: ServerState, plan: RoundPlan, batch) -> dict[str, Any]:
        columns = super().report(state, plan, batch)
        if batch is not None:
            columns.update(self.diagnose(state.model, plan, *batch))
        return columns

    def diagnose(self, model: StagedModel, plan: RoundPlan, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """The norm discrepancy q_t of Eq. 11 (Fig. 7) on one batch, at the round's stage ``s``.

        ``q_t = ||grad f(x_t)|| / (alpha_t ||grad f^s(x_t^s)|_{E_s}||)`` with
        ``alpha_t = min(1, <grad f|_{E_s}, grad f^s|_{E_s}> / ||grad f^s|_{E_s}||^2)``: ``f`` is the
        full model's loss (blocks not yet grown at their current, initial weights), ``f^s`` the
        sub-model's through its own head, restricted to the shared blocks ``E_1..E_s`` (the whole model
        in the last stage, where f^S = f). q_t is NaN when alpha_t <= 0 (the paper leaves that case
        undefined); it is 1 in the last stage.
        """
        if not isinstance(model, SequentialStagedModel):
            return {}
        stage, last = plan.stage, model.num_stages
        params = dict(model.named_parameters())
        everything = [n for n in active_names(model, last) if n in params]
        # E_1..E_s; in the last stage f^S = f and the projection is the whole model (head included), so
        # alpha_t = q_t = 1 there, as the paper notes
        restricted = _blocks(stage) if stage < last else tuple(model.stage_modules(last))
        shared = [n for n in names_under(model, restricted) if n in params]
        was_training = model.training
        model.eval()  # no running statistics move; gradients flow regardless
        try:
            with torch.enable_grad():
                full = torch.autograd.grad(self.task.loss(model.forward_stage(x, last), y), [params[n] for n in everything])
                sub = torch.autograd.grad(self.task.loss(model.forward_stage(x, stage), y), [params[n] for n in shared])
        finally:
            model.train(was_training)
        full_by_name = dict(zip(everything, full))
        flat = lambda grads: torch.cat([g.reshape(-1).double() for g in grads])  # noqa: E731
        g_full, g_full_shared, g_sub = flat(full), flat(full_by_name[n] for n in shared), flat(sub)
        denominator = float(g_sub.norm())
        alpha = min(1.0, float(g_full_shared @ g_sub) / denominator**2) if denominator > 0 else float("nan")
        q = float(g_full.norm()) / (alpha * denominator) if alpha > 0 else float("nan")
        return {"q_t": q, "q_alpha": alpha}

    def grow(self, state: ServerState, to_stage: int) -> None:
        """Grow the global model to ``to_stage`` (Alg. 1 lines 5-11).

        Shared blocks carry over; the entering block and head are initialised from the
        generator seeded by (seed, stage, module), which clients can reproduce; the old
        head leaves the active set. Server-optimizer state of surviving parameters is
        kept (or reset with ``progfed_fedadam_reset_on_growth``); new ones start fresh.
        """
        model = state.model
        before = set(active_names(model, model.stage))
        old_stage, old_params = model.stage, count_parameters(model, model.stage)
        entered = grow(model, to_stage, self.training.seed)
        state.optimizer.on_growth(before & set(active_names(model, to_stage)))
        log.info(
            "round %d: grew from stage %d to %d (%s entered, old head dropped); active parameters %d -> %d",
            state.round, old_stage, to_stage, ", ".join(entered), old_params, count_parameters(model, to_stage),
        )


def build_progfed(settings: ProgFedConfig, training: TrainingSettings, num_stages: int, task: Task) -> ProgFed:
    return ProgFed(settings, training, num_stages, task)


def build_end_to_end(settings: ProgFedConfig, training: TrainingSettings, num_stages: int, task: Task) -> ProgFed:
    return ProgFed(settings, training, num_stages, task, end_to_end=True)
