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
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from fedml_progfed.algorithms.base import (
    Algorithm, ClientUpdate, Layout, LocalResult, MemoryProbe, RoundPlan, ServerState, merge_updates,
)
from fedml_progfed.config.schema import RunConfig
from fedml_progfed.core.flops import train_flops
from fedml_progfed.core.local_sgd import SGDSettings, local_sgd
from fedml_progfed.core.registry import Registry
from fedml_progfed.core.schedule import Schedule
from fedml_progfed.core.seeding import derive_seed
from fedml_progfed.core.server_optim import build_server_optimizer
from fedml_progfed.core.staged_model import (
    SequentialStagedModel,
    StagedModel,
    active_names,
    copy_state,
    count_parameters,
    grow,
    init_stage_modules,
    names_under,
    new_names,
    release,
    set_trainable,
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
    config
        The validated run configuration (``progfed_args`` and FedML's training keys).
    num_stages
        ``S`` of the model being trained.
    task
        Loss (and metric) of the data set.
    end_to_end
        Train the full model every round: the ``e2e`` baseline.
    """

    name = "progfed"

    def __init__(self, config: RunConfig, num_stages: int, task: Task, end_to_end: bool = False) -> None:
        p = config.progfed
        self.config = config
        self.task = task
        self.end_to_end = end_to_end
        lr_options = dict(
            lr=config.learning_rate, lr_schedule=p.lr_schedule, lr_min=p.lr_min, lr_restart_at_growth=p.lr_restart_at_growth
        )
        if end_to_end:
            self.schedule = Schedule.end_to_end(config.comm_round, num_stages, **lr_options)
        else:
            self.schedule = Schedule.progressive(
                config.comm_round, num_stages, p.schedule, p.warmup_rounds, p.warmup_mode, **lr_options
            )
        self.prox_mu = p.fedprox_mu if p.optimizer == "fedprox" else 0.0
        self.update = "progressive" if end_to_end else p.update
        self.rule = UPDATE_RULES.lookup(self.update, "progfed.update")
        if self.update != "progressive" and p.warmup_rounds:
            raise FieldError("progfed.warmup_rounds", f"warm-up belongs to progfed_update: progressive; "
                                                      f"{self.update!r} trains its own set from the start")
        self._flops_per_sample: dict[tuple[int, bool], float] = {}

    # ------------------------------------------------------------------ plan

    @property
    def total_rounds(self) -> int:
        return self.schedule.total_rounds

    def plan_for_round(self, round_idx: int) -> RoundPlan:
        """The plan of ``round_idx``: it depends on the round alone (the schedule is fixed)."""
        spec = self.schedule.at(round_idx)
        stage = spec.stage
        if self.rule.random_stage:
            rng = np.random.default_rng(derive_seed("random-stage", self.config.random_seed, round_idx))
            stage = int(rng.integers(1, self.schedule.phases[-1].stage + 1))
        return RoundPlan(round=round_idx, stage=stage, lr=spec.lr, warmup=spec.warmup)

    def plan(self, state: ServerState) -> RoundPlan:
        return self.plan_for_round(state.round)

    def init_state(self, model: StagedModel) -> ServerState:
        state = ServerState(model, build_server_optimizer(self.config.progfed))
        model.stage = self.schedule.at(0).stage
        return state

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
        return Layout(active=active, trainable=trainable, upload=upload, frozen_modules=frozen, entering=entering)

    def seeded_modules(self, state: ServerState, plan: RoundPlan) -> tuple[str, ...]:
        """With ``progfed_send_entering: false``, the growth round's entering modules (clients seed them)."""
        if self.config.progfed.send_entering or plan.round >= self.total_rounds:
            return ()
        return self.layout(state.model, plan).entering

    def prepare_client(self, model: StagedModel, plan: RoundPlan, seeded: Sequence[str]) -> None:
        model.stage = model.check_stage(plan.stage)
        if seeded:
            # The same seeded initialisation the server's grow() used (Alg. 1 lines 5-11).
            if set(seeded) != set(model.new_modules(plan.stage)):
                raise ValueError(f"seeded modules {list(seeded)} are not stage {plan.stage}'s entering modules")
            init_stage_modules(model, plan.stage, self.config.random_seed)

    # ------------------------------------------------------------------ client

    def _objective(self, stage: int, num_stages: int):
        """The loss of a stage-``stage`` round: each supervising head's loss, weighted (Table 6)."""
        supervision = self.rule.supervision(stage, num_stages)
        if supervision == ((stage, 1.0),):
            return lambda m, x, y: self.task.loss(m.forward_stage(x, stage), y)
        return lambda m, x, y: sum(w * self.task.loss(m.forward_stage(x, st), y) for st, w in supervision)

    def memory_probe(self, model: StagedModel, plan: RoundPlan) -> MemoryProbe:
        layout = self.layout(model, plan)
        return MemoryProbe(
            key=f"stage {plan.stage}" + (" warm-up" if plan.warmup else ""),
            prepare=lambda probe: self._prepare(probe, plan, layout),
            keep_modules=self._modules(model, plan.stage),
            objective=self._objective(plan.stage, model.num_stages),
        )

    def evaluated(self, model: StagedModel, plan: RoundPlan):
        scored = RoundPlan(round=plan.round, stage=self.rule.scored(plan.stage, model.num_stages), lr=plan.lr)
        return super().evaluated(model, scored)

    def _prepare(self, model: StagedModel, plan: RoundPlan, layout: Layout) -> None:
        model.stage = plan.stage
        set_trainable(model, layout.trainable, layout.frozen_modules)

    def client_update(
        self, model: StagedModel, plan: RoundPlan, batches: Iterable, device: torch.device, client: int
    ) -> LocalResult:
        """Local SGD on the round's trainable set (Alg. 1 lines 19-24), a fresh optimizer every round."""
        started = time.perf_counter()
        # Seeding by (run, round, client) makes shuffling and dropout identical in every runtime.
        torch.manual_seed(derive_seed("train", self.config.random_seed, plan.round, client))
        model.to(device)
        layout = self.layout(model, plan)
        self._prepare(model, plan, layout)
        params = [p for p in model.parameters() if p.requires_grad]
        settings = SGDSettings(
            lr=plan.lr,
            momentum=self.config.momentum,
            weight_decay=self.config.weight_decay,
            epochs=self.config.epochs,
            prox_mu=self.prox_mu,
        )
        objective = self._objective(plan.stage, model.num_stages)
        loss, samples = local_sgd(params, batches, lambda x, y: objective(model, x, y), settings, device)
        release(model)
        flops = round(self._train_flops_per_sample(model, plan, layout, batches) * samples)
        return LocalResult(
            tensors=copy_state(model, layout.upload),
            samples=samples,
            train_loss=loss,
            flops=flops,
            compute_s=time.perf_counter() - started,
        )

    def _train_flops_per_sample(self, model: StagedModel, plan: RoundPlan, layout: Layout, batches: Iterable) -> float:
        """Measured once per (stage, warm-up) on a one-sample batch, then scaled by samples seen."""
        key = (plan.stage, plan.warmup)
        if key not in self._flops_per_sample:
            x, y = next(iter(batches))
            self._flops_per_sample[key] = float(
                train_flops(
                    model,
                    lambda probe: self._prepare(probe, plan, layout),
                    self._objective(plan.stage, model.num_stages),
                    x[:1],
                    y[:1],
                )
            )
        return self._flops_per_sample[key]

    # ------------------------------------------------------------------ server

    def server_update(self, state: ServerState, plan: RoundPlan, updates: Sequence[ClientUpdate]) -> None:
        """Aggregate (Alg. 1 line 27) and step the server optimizer."""
        merge_updates(state, self.layout(state.model, plan).upload, updates)
        state.round += 1

    def start_round(self, state: ServerState) -> RoundPlan:
        """The round's plan; at the first round of a stage the global model grows first (Alg. 1 line 5)."""
        plan = self.plan(state)
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
        entered = grow(model, to_stage, self.config.random_seed)
        state.optimizer.on_growth(before & set(active_names(model, to_stage)))
        log.info(
            "round %d: grew from stage %d to %d (%s entered, old head dropped); active parameters %d -> %d",
            state.round, old_stage, to_stage, ", ".join(entered), old_params, count_parameters(model, to_stage),
        )


def build_progfed(config: RunConfig, num_stages: int, task: Task) -> ProgFed:
    return ProgFed(config, num_stages, task)


def build_end_to_end(config: RunConfig, num_stages: int, task: Task) -> ProgFed:
    return ProgFed(config, num_stages, task, end_to_end=True)
