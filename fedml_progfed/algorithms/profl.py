"""ProFL (Wu, Li, Xu; KDD 2025): progressive block training with freezing, for clients that cannot fit the model.

The model's blocks ``E_1..E_S`` (the staged model's stages; for a CIFAR ResNet the
stem with ``layer1``, then ``layer2..layer4``) are trained one at a time, so a
client only ever holds gradients, optimizer state and saved activations of one
block and a light output module. Each block ``k`` has a **basic layer** ``B_k``: the
cheapest module with the block's input and output shapes (one 3x3 convolution
with the block's stride and channel change, as in the authors' release; a pooled
linear layer for a fully connected block). ``O_k = B_{k+1} o ... o B_S o head`` is
block ``k``'s **output module** (``O_S`` is the head).

Steps, in order (our spec, section 0, settles what the authors' code shows):

**Shrinking**, ``k = S..2`` (back to front). Step ``shrink k`` trains ``E_k`` and ``O_k``
with cross-entropy behind the frozen prefix ``E_1..E_{k-1}`` (run under
``torch.no_grad()``, normalisation statistics held; ``profl_shrink_prefix: basic``
puts the trainable basic layers ``B_1..B_{k-1}`` there instead). Then a second
step of ``shrink k`` trains ``B_k`` alone to imitate that model's logits with an MSE loss
(the teacher is the same prefix with ``E_k``, the student has ``B_k`` in its place;
both end in ``O_k``). Products: ``E_k``'s initial weights and the output module
``O_{k-1} = B_k o O_k``.

**Growing**, ``t = 1..S`` (front to back). Step ``grow t`` trains ``E_t`` and ``O_t``
with cross-entropy behind the frozen ``E_1..E_{t-1}``, starting ``O_t`` from the output
module ``shrink t`` produced (the authors' release loads it). When a step ends, its
block freezes for good; ``O_t`` is left behind, so the final model is exactly the
original architecture. The last step takes the remaining rounds.

Settings follow the authors where they speak: a constant learning rate per step
(``profl.lr`` 0.01, distillation ``profl.distill_lr`` 1e-5, not the run-wide decay), the
whole model in train mode (``profl.frozen_norm: train``: the frozen blocks' normalisation
statistics follow the data and are averaged with the update) and the unweighted mean of
the clients' updates (``progfed.aggregation_weights`` empty).

**Freezing**: after every round the server records a fixed sample of at most
``profl_em_sample`` scalars of the block being trained and computes the
**effective movement** over the last ``W`` rounds (:func:`effective_movement`); a
step ends when it stays below ``profl_em_threshold`` for ``profl_em_patience``
rounds after at least ``profl.min_rounds_per_step``; ``profl.max_rounds_per_step`` is a safety
net (each step's log entry says whether it ``ended`` by ``em``, ``cap`` or was ``skipped``).

S = 1 is FedAvg on the full model (one step, ``grow 1``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedml_progfed.algorithms.base import (
    Algorithm,
    ClientUpdate,
    Layout,
    Objective,
    RoundPlan,
    ServerState,
    TrainingSettings,
    Untrainable,
    merge_updates,
)
from fedml_progfed.config.schema import ProFLConfig
from fedml_progfed.core.seeding import derive_seed
from fedml_progfed.core.server_optim import build_server_optimizer
from fedml_progfed.core.staged_model import (
    SequentialStagedModel,
    StagedModel,
    copy_state,
    forget_layout,
    load_state,
    names_under,
    parameter_names,
)
from fedml_progfed.errors import FieldError
from fedml_progfed.models import models_with
from fedml_progfed.tasks.base import Task

log = logging.getLogger("fedml_progfed")

PHASES = ("shrink", "grow")


def effective_movement(trajectory: Sequence[torch.Tensor], window: int = 6) -> float:
    """Effective movement of a block over the last ``window`` rounds (ProFL, our spec sec. 0).

    ``EM_r = ||w_r - w_{r-W}||_1 / sum_{i=r-W+1..r} ||w_i - w_{i-1}||_1`` on the sampled
    scalars ``w`` after each round, oldest first: 1.0 for a straight line, 0.0 for a
    back-and-forth of even length (the block oscillates: it has converged).

    Parameters
    ----------
    trajectory
        1-D tensors, one per round, oldest first; at least ``window + 1`` of them.
    window
        ``W``, the number of steps looked back.
    """
    if len(trajectory) < window + 1:
        raise ValueError(f"effective movement over {window} rounds needs {window + 1} points, got {len(trajectory)}")
    points = [t.double() for t in trajectory[-(window + 1):]]
    path = sum(float((b - a).abs().sum()) for a, b in zip(points, points[1:]))
    if path == 0.0:
        return 0.0  # nothing moved: as converged as it gets
    return float((points[-1] - points[0]).abs().sum()) / path


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Step:
    """One step: which modules run (in order), which train, and what is distilled.

    ``path`` is the student's forward path as module names; its first ``frozen_prefix``
    modules run under ``torch.no_grad()``. ``teacher`` is the distillation teacher's path
    (empty for cross-entropy steps). ``tracked`` is the block whose movement decides freezing.
    """

    phase: str
    block: int
    path: tuple[str, ...]
    frozen_prefix: int
    trained: tuple[str, ...]
    tracked: str
    teacher: tuple[str, ...] = ()

    @property
    def objective(self) -> str:
        return "mse" if self.teacher else "ce"

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.path, *self.teacher)))

    @property
    def label(self) -> str:
        return f"{self.phase} {self.block}" + (" (distil B)" if self.teacher else "")


def build_steps(num_blocks: int, shrink_prefix: str = "real") -> list[Step]:
    """The step sequence: shrink S (train E_S, then distil B_S), ..., shrink 2 (likewise), grow 1, ..., grow S."""
    S = num_blocks
    block = lambda k: f"blocks.{k - 1}"  # noqa: E731  E_k
    basic = lambda k: f"basic.{k - 1}"  # noqa: E731  B_k
    head = f"heads.{S - 1}"
    output = lambda k: tuple(basic(j) for j in range(k + 1, S + 1)) + (head,)  # noqa: E731  O_k
    steps: list[Step] = []
    for k in range(S, 1, -1):
        if shrink_prefix == "real":
            prefix, frozen = tuple(block(j) for j in range(1, k)), k - 1
        else:
            prefix, frozen = tuple(basic(j) for j in range(1, k)), 0
        trainable_prefix = prefix if frozen == 0 else ()
        steps.append(Step("shrink", k, (*prefix, block(k), *output(k)), frozen, (*trainable_prefix, block(k), *output(k)), block(k)))
        steps.append(
            Step("shrink", k, (*prefix, basic(k), *output(k)), len(prefix), (basic(k),), basic(k), (*prefix, block(k), *output(k)))
        )
    for t in range(1, S + 1):
        prefix = tuple(block(j) for j in range(1, t))
        steps.append(Step("grow", t, (*prefix, block(t), *output(t)), t - 1, (block(t), *output(t)), block(t)))
    return steps


def output_module(step: Step) -> tuple[str, ...]:
    """The modules of the step's output module ``O_k`` (the path after its block)."""
    return step.path[step.path.index(f"blocks.{step.block - 1}") + 1:]


class Path(nn.Module):
    """A step's forward path over the shared model: a frozen prefix under ``no_grad``, then the rest."""

    def __init__(self, model: StagedModel, names: Sequence[str], frozen_prefix: int) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.frozen_prefix = frozen_prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = [self.model.get_submodule(n) for n in self.names]
        with torch.no_grad():
            for module in modules[: self.frozen_prefix]:
                x = module(x)
        for module in modules[self.frozen_prefix:]:
            x = module(x)
        return x


def basic_layer(input_shape: Sequence[int], output_shape: Sequence[int]) -> nn.Module:
    """The cheapest module mapping ``input_shape`` to ``output_shape`` (ProFL's basic layer).

    Image to image: one bias-free 3x3 convolution with the block's stride and channel
    change, as the authors' release does (``Conv2d(c_in, c_out, 3, stride=2, padding=1)``),
    then adaptive average pooling only if the stride cannot hit the size exactly.
    Image to vector: global average pooling and one linear layer. Vector to vector: linear.
    """
    c_in, *spatial_in = input_shape
    c_out, *spatial_out = output_shape
    if spatial_in and spatial_out:
        stride = max(1, round(spatial_in[0] / spatial_out[0]))
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)]
        reached = [(s + 2 - 3) // stride + 1 for s in spatial_in]
        if reached != list(spatial_out):
            layers.append(nn.AdaptiveAvgPool2d(tuple(spatial_out)))
        return nn.Sequential(*layers)
    if spatial_in:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, c_out))
    return nn.Linear(c_in, c_out)


def attach_basic_layers(model: SequentialStagedModel, input_shape: Sequence[int], seed: int) -> None:
    """Register ``model.basic = [B_1..B_S]`` (seeded), checking each by a dry forward against its block."""
    shapes = [tuple(input_shape), *model.feature_shapes(input_shape)]
    layers = []
    for k in range(len(model.blocks)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed("profl-basic", seed, k))
            layer = basic_layer(shapes[k], shapes[k + 1])
        with torch.no_grad():
            produced = tuple(layer(torch.zeros(2, *shapes[k])).shape[1:])
        if produced != shapes[k + 1]:
            raise ValueError(f"basic layer for block {k + 1} maps {shapes[k]} to {produced}, the block to {shapes[k + 1]}")
        layers.append(layer)
    device = next(model.parameters()).device
    model.add_module("basic", nn.ModuleList(layers).to(device))
    model.train(model.training)  # the new modules follow the model's mode
    forget_layout(model)


# --------------------------------------------------------------------------- the algorithm


@dataclass
class ProFLState:
    """What ProFL keeps across rounds beyond the model (checkpointed with it).

    Attributes
    ----------
    step
        Index of the step being trained (:func:`build_steps`).
    step_start
        The round it started in.
    low
        Consecutive rounds with effective movement below the threshold.
    em
        The latest effective movement (``None`` before ``W`` rounds of the step).
    log
        One entry per finished step: phase, block, start, rounds and why it ended.
    em_history
        ``[round, step, em]`` per aggregated round.
    em_indices, em_trajectory
        The step's fixed sample of scalars and their values after the last ``W`` rounds.
    outputs
        The output module ``O_k`` as ``shrink k`` left it, by ``k``: ``grow k`` starts from it.
    """

    step: int = 0
    step_start: int = 0
    low: int = 0
    em: float | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    em_history: list[list[Any]] = field(default_factory=list)
    em_indices: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    em_trajectory: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    outputs: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        meta = {"step": self.step, "step_start": self.step_start, "low": self.low, "em": self.em,
                "log": [dict(e) for e in self.log], "em_history": [list(e) for e in self.em_history]}
        tensors = {"em/indices": self.em_indices, "em/trajectory": self.em_trajectory}
        tensors.update({f"output/{k}/{name}": t for k, module in self.outputs.items() for name, t in module.items()})
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.step, self.step_start, self.low = int(meta["step"]), int(meta["step_start"]), int(meta["low"])
        self.em = None if meta["em"] is None else float(meta["em"])
        self.log = [dict(e) for e in meta["log"]]
        self.em_history = [list(e) for e in meta.get("em_history", [])]
        self.em_indices, self.em_trajectory = tensors["em/indices"], tensors["em/trajectory"]
        self.outputs = {}
        for key, tensor in tensors.items():
            if key.startswith("output/"):
                k, name = key[len("output/"):].split("/", 1)
                self.outputs.setdefault(int(k), {})[name] = tensor


class ProFL(Algorithm):
    """ProFL over a :class:`SequentialStagedModel` (see the module docstring).

    Parameters
    ----------
    settings
        ProFL's own section (effective movement, step bounds, distillation, shrink prefix).
    training
        The shared training settings (rounds, learning rate and its decay, SGD, seed).
    num_stages
        ``S``, the number of blocks.
    task
        Loss (and metric) of the data set.
    """

    name = "profl"
    auxiliary_modules = ("basic",)  # output modules are not part of the architecture a run hands over

    def __init__(self, settings: ProFLConfig, training: TrainingSettings, num_stages: int, task: Task) -> None:
        self.p = settings
        self.training = training
        self.task = task
        self.total_rounds = training.rounds
        self.steps = build_steps(num_stages, settings.shrink_prefix)
        rounds, before_last = training.rounds, len(self.steps) - 1
        if before_last == 0:
            self.max_rounds = rounds
        elif settings.max_rounds_per_step is not None:
            self.max_rounds = settings.max_rounds_per_step
            if before_last * self.max_rounds >= rounds:
                raise FieldError(
                    "profl.max_rounds_per_step",
                    f"{self.max_rounds} rounds for each of the {before_last} steps before the last leave no round of "
                    f"{{comm_round}} ({rounds}) for the last; lower it or raise {{comm_round}}",
                )
        else:
            # a safety net: effective movement ends steps; without it every step gets an equal share
            steps = before_last + 1
            self.max_rounds = rounds // steps
            if self.max_rounds < settings.min_rounds:
                raise FieldError(
                    "comm_round",
                    f"{rounds} rounds give each of ProFL's {steps} steps at most {self.max_rounds} rounds "
                    f"(comm_round / steps), fewer than {{profl.min_rounds_per_step}} ({settings.min_rounds}); "
                    f"raise it to at least {steps * settings.min_rounds} or set {{profl.max_rounds_per_step}}",
                )

    # ------------------------------------------------------------------ set-up

    def prepare_model(self, model: StagedModel) -> None:
        if not isinstance(model, SequentialStagedModel) or len(model.input_shape) != 3:
            raise FieldError("model", f"ProFL splits feed-forward image models into blocks with basic layers; "
                                      f"use one of {', '.join(models_with('profl'))}")
        attach_basic_layers(model, model.input_shape, self.training.seed)

    def init_state(self, model: StagedModel) -> ServerState:
        model.stage = model.num_stages
        state = ServerState(model, build_server_optimizer(self.training.server), ProFLState())
        self._start_tracking(state, state.round)
        return state

    def step_of(self, plan: RoundPlan) -> Step:
        return self.steps[int(plan.details["step"])]

    # ------------------------------------------------------------------ plan

    def _plan(self, state: ServerState) -> RoundPlan:
        index = state.algorithm.step
        step = self.steps[index]
        details = {"step": index, "phase": step.phase, "block": step.block, "objective": step.objective}
        return RoundPlan(round=state.round, stage=state.model.num_stages, lr=self._lr(state.round, step), details=details)

    def _lr(self, round_idx: int, step: Step) -> float:
        """A constant rate per step, as the authors: ``profl.distill_lr`` for distillation, else ``profl.lr``."""
        return self.p.distill_lr if step.teacher else self.p.lr

    def start_round(self, state: ServerState, untrainable: Untrainable) -> RoundPlan:
        """The current step's plan; a step no client can train ends untrained (the last one never does)."""
        plan = self._plan(state)
        if state.round >= self.total_rounds:
            return replace(plan, lr=0.0)  # the final broadcast: nobody trains
        while state.algorithm.step < len(self.steps) - 1 and (reason := untrainable(plan)) is not None:
            log.warning("round %d: %s; skipping it", plan.round, reason)
            self._end_step(state, reason, ended="skipped")
            plan = self._plan(state)
        return plan

    def layout(self, model: StagedModel, plan: RoundPlan) -> Layout:
        """The step's path runs; its trained modules train. Frozen modules' normalisation statistics are held
        (``profl.frozen_norm: eval``) or follow the data and travel up with the update (``train``, the authors)."""
        step = self.step_of(plan)
        active = tuple(names_under(model, step.modules))
        params = parameter_names(model)
        trained = names_under(model, step.trained)
        frozen = tuple(m for m in step.modules if m not in step.trained)
        if self.p.frozen_norm == "train":
            held, moving = (), [n for n in names_under(model, frozen) if n not in params]
        else:
            held, moving = frozen, []
        sent_up = set(trained) | set(moving)
        upload = tuple(n for n in active if n in sent_up)
        return Layout(label=step.label, modules=step.modules, active=active,
                      trainable=tuple(n for n in trained if n in params), upload=upload, frozen_modules=held)

    # ------------------------------------------------------------------ client

    def objective(self, model: StagedModel, plan: RoundPlan) -> Objective:
        """The step's loss: cross-entropy, or MSE to the teacher's logits (distillation).

        A distillation step's student and teacher share the frozen prefix, so it runs once.
        """
        step = self.step_of(plan)
        if not step.teacher:
            return lambda m, x, y: self.task.loss(Path(m, step.path, step.frozen_prefix)(x), y)
        shared = step.frozen_prefix

        def distill(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            h = Path(m, step.path[:shared], shared)(x)
            with torch.no_grad():
                target = Path(m, step.teacher[shared:], 0)(h)
            return F.mse_loss(Path(m, step.path[shared:], 0)(h), target)

        return distill

    def scored(self, model: StagedModel, plan: RoundPlan) -> nn.Module:
        step = self.step_of(plan)
        return Path(model, step.path, len(step.path))

    # ------------------------------------------------------------------ server

    def server_update(self, state: ServerState, plan: RoundPlan, layout: Layout, updates: Sequence[ClientUpdate]) -> None:
        """Average the trained block and output module, track the block's movement, freeze when it settles."""
        merge_updates(state, layout.upload, updates)
        self._track(state, done=state.round + 1)

    def _tracked_vector(self, state: ServerState) -> torch.Tensor:
        step = self.steps[state.algorithm.step]
        model_state = state.model.state_dict()
        flat = torch.cat([model_state[n].detach().reshape(-1).float().cpu() for n in names_under(state.model, (step.tracked,))
                          if n in parameter_names(state.model)])
        return flat[state.algorithm.em_indices]

    def _start_tracking(self, state: ServerState, done: int) -> None:
        """Fix the step's sample of scalars (once per step, seeded) and record the starting point."""
        own = state.algorithm
        step = self.steps[own.step]
        size = sum(state.model.state_dict()[n].numel() for n in names_under(state.model, (step.tracked,))
                   if n in parameter_names(state.model))
        rng = np.random.default_rng(derive_seed("profl-em", self.training.seed, own.step))
        count = min(size, self.p.em_sample)
        indices = np.sort(rng.choice(size, count, replace=False)) if count < size else np.arange(size)
        own.em_indices = torch.from_numpy(indices.astype(np.int64))
        own.em_trajectory = self._tracked_vector(state).unsqueeze(0)
        own.step_start, own.low, own.em = done, 0, None

    def _track(self, state: ServerState, done: int) -> None:
        """Record the block's sampled scalars after ``done`` rounds; end the step when EM settles or at its cap."""
        own = state.algorithm
        trajectory = torch.cat([own.em_trajectory, self._tracked_vector(state).unsqueeze(0)])
        window = self.p.em_window
        own.em_trajectory = trajectory[-(window + 1):]
        rounds = done - own.step_start
        em = effective_movement(list(trajectory), window) if len(trajectory) >= window + 1 else None
        own.em = em
        own.em_history.append([done - 1, own.step, em])
        if own.step == len(self.steps) - 1:
            return  # the last step takes the remaining rounds
        if em is not None and rounds >= self.p.min_rounds:
            own.low = own.low + 1 if em < self.p.em_threshold else 0
        if own.low >= self.p.em_patience:
            self._end_step(state, f"EM below {self.p.em_threshold} for {self.p.em_patience} rounds", done, ended="em")
        elif rounds >= self.max_rounds:
            self._end_step(state, f"reached profl_max_rounds_per_step ({self.max_rounds})", done, ended="cap")

    def _end_step(self, state: ServerState, reason: str, done: int | None = None, ended: str = "em") -> None:
        """The one place where a block freezes and the next step starts (after ``done`` rounds).

        ``ended`` says how: ``em`` (effective movement settled), ``cap`` (the safety net) or
        ``skipped`` (no client's memory fits the step).
        """
        own = state.algorithm
        done = state.round if done is None else done
        step = self.steps[own.step]
        entry = {"step": own.step, "phase": step.phase, "block": step.block,
                 "start": own.step_start, "rounds": done - own.step_start, "reason": reason, "ended": ended}
        own.log.append(entry)
        log.info("round %d: %s ends after %d rounds (%s); %s starts", done, step.label, entry["rounds"],
                 reason, self.steps[own.step + 1].label)
        if step.phase == "shrink" and not step.teacher:
            # O_k as shrink k trained it: grow k starts from it (the authors' release loads it)
            own.outputs[step.block] = copy_state(state.model, names_under(state.model, output_module(step)))
        own.step += 1
        following = self.steps[own.step]
        if following.phase == "grow" and following.block in own.outputs:
            load_state(state.model, own.outputs[following.block], list(own.outputs[following.block]),
                       what="profl output module")
        self._start_tracking(state, done)

    def report(self, state: ServerState, plan: RoundPlan, batch) -> dict[str, Any]:
        step = self.step_of(plan)
        # the EM of the round just aggregated (the history keeps it when that round ended its step)
        history = state.algorithm.em_history
        em = history[-1][2] if history and history[-1][0] == plan.round else None
        return {"phase": step.phase, "step": int(plan.details["step"]), "block": step.block,
                "objective": step.objective, "em": float("nan") if em is None else em}
