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
with cross-entropy behind the frozen ``E_1..E_{t-1}``. When a step ends, its block
freezes for good; ``O_t`` is left behind (the next step trains ``O_{t+1}``, which
reuses ``B_{t+2}..B_S`` and the head), so the final model is exactly the original
architecture. The last step takes the remaining rounds.

**Freezing**: after every round the server records a fixed sample of at most
``profl_em_sample`` scalars of the block being trained and computes the
**effective movement** over the last ``W`` rounds (:func:`effective_movement`); a
step ends when it stays below ``profl_em_threshold`` for ``profl_em_patience``
rounds after at least ``profl_min_rounds_per_step``, or at ``profl_max_rounds_per_step``.

S = 1 is FedAvg on the full model (one step, ``grow 1``).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedml_progfed.algorithms.base import (
    Algorithm,
    ClientUpdate,
    Layout,
    LocalResult,
    MemoryProbe,
    RoundPlan,
    ServerState,
    merge_updates,
)
from fedml_progfed.config.schema import RunConfig
from fedml_progfed.core.flops import train_flops
from fedml_progfed.core.local_sgd import SGDSettings, local_sgd
from fedml_progfed.core.schedule import LR_SCHEDULES
from fedml_progfed.core.seeding import derive_seed
from fedml_progfed.core.server_optim import build_server_optimizer
from fedml_progfed.core.staged_model import (
    SequentialStagedModel,
    StagedModel,
    copy_state,
    forget_layout,
    names_under,
    parameter_names,
    release,
    set_trainable,
)
from fedml_progfed.errors import FieldError
from fedml_progfed.tasks.base import Task

log = logging.getLogger("fedml_progfed")

PHASES = ("shrink", "grow")
#: Models whose blocks and basic layers ProFL supports (every feed-forward image model of the registry).
PROFL_MODELS = ("convnet", "convnet_emnist", "resnet18", "resnet152", "vgg16", "vgg19")


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


class ProFL(Algorithm):
    """ProFL over a :class:`SequentialStagedModel` (see the module docstring).

    Parameters
    ----------
    config
        The validated run configuration (``profl_args`` and FedML's training keys).
    num_stages
        ``S``, the number of blocks.
    task
        Loss (and metric) of the data set.
    """

    name = "profl"

    def __init__(self, config: RunConfig, num_stages: int, task: Task) -> None:
        self.config = config
        self.p = config.profl
        self.task = task
        self.steps = build_steps(num_stages, self.p.shrink_prefix)
        self._flops: dict[int, float] = {}
        rounds, before_last = config.comm_round, len(self.steps) - 1
        if before_last == 0:
            self.max_rounds = rounds
        elif self.p.max_rounds_per_step is not None:
            self.max_rounds = self.p.max_rounds_per_step
            if before_last * self.max_rounds >= rounds:
                raise FieldError(
                    "profl.max_rounds_per_step",
                    f"{self.max_rounds} rounds for each of the {before_last} steps before the last leave no round of "
                    f"train_args.comm_round ({rounds}) for the last; lower it or raise comm_round",
                )
        else:
            self.max_rounds = rounds // (2 * before_last)
            if self.max_rounds < self.p.min_rounds:
                raise FieldError(
                    "comm_round",
                    f"{rounds} rounds give each of ProFL's {before_last} steps before the last at most {self.max_rounds} "
                    f"rounds (comm_round / (2 x steps)), fewer than profl_min_rounds_per_step ({self.p.min_rounds}); "
                    f"raise comm_round to at least {2 * before_last * self.p.min_rounds} or set profl_max_rounds_per_step",
                )

    # ------------------------------------------------------------------ set-up

    def prepare_model(self, model: StagedModel) -> None:
        if not isinstance(model, SequentialStagedModel) or len(model.input_shape) != 3:
            raise FieldError("model", f"ProFL splits feed-forward image models into blocks with basic layers; "
                                      f"use one of {', '.join(PROFL_MODELS)}")
        attach_basic_layers(model, model.input_shape, self.config.random_seed)

    @property
    def total_rounds(self) -> int:
        return self.config.comm_round

    def init_state(self, model: StagedModel) -> ServerState:
        model.stage = model.num_stages
        state = ServerState(model, build_server_optimizer(self.config.progfed))
        state.extra.update(step=0, step_start=0, low=0, em=None, log=[])
        self._start_tracking(state)
        return state

    def step_of(self, plan: RoundPlan) -> Step:
        return self.steps[int(plan.details["step"])]

    # ------------------------------------------------------------------ plan

    def plan(self, state: ServerState) -> RoundPlan:
        index = int(state.extra["step"])
        step = self.steps[index]
        details = {"step": index, "phase": step.phase, "block": step.block, "objective": step.objective}
        return RoundPlan(round=state.round, stage=state.model.num_stages, lr=self._lr(state.round, step), details=details)

    def _lr(self, round_idx: int, step: Step) -> float:
        """``profl_distill_lr`` for distillation; else ``progfed_lr_schedule`` over the run, as for every method."""
        if step.teacher:
            return self.p.distill_lr
        p = self.config.progfed
        decay = LR_SCHEDULES.lookup(p.lr_schedule, "progfed.lr_schedule")
        return decay(self.config.learning_rate, p.lr_min, round_idx / self.total_rounds)

    def final_plan(self, state: ServerState) -> RoundPlan:
        return replace(self.plan(state), lr=0.0)  # nobody trains on the final broadcast

    def layout(self, model: StagedModel, plan: RoundPlan) -> Layout:
        step = self.step_of(plan)
        active = tuple(names_under(model, step.modules))
        upload = tuple(names_under(model, step.trained))
        params = parameter_names(model)
        frozen = tuple(m for m in step.modules if m not in step.trained)
        return Layout(active=active, trainable=tuple(n for n in upload if n in params), upload=upload, frozen_modules=frozen)

    def skip_step(self, state: ServerState, plan: RoundPlan, reason: str) -> bool:
        """End the current step without training it (no client fits); False for the last step."""
        if int(state.extra["step"]) == len(self.steps) - 1:
            return False
        self._end_step(state, reason)
        return True

    # ------------------------------------------------------------------ client

    def _objective(self, step: Step):
        """The step's loss on a model: cross-entropy, or MSE to the teacher's logits (distillation).

        A distillation step's student and teacher share the frozen prefix, so it runs once.
        """
        if not step.teacher:
            return lambda m, x, y: self.task.loss(Path(m, step.path, step.frozen_prefix)(x), y)
        shared = step.frozen_prefix

        def distill(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            h = Path(m, step.path[:shared], shared)(x)
            with torch.no_grad():
                target = Path(m, step.teacher[shared:], 0)(h)
            return F.mse_loss(Path(m, step.path[shared:], 0)(h), target)

        return distill

    def client_update(
        self, model: StagedModel, plan: RoundPlan, batches: Iterable, device: torch.device, client: int
    ) -> LocalResult:
        """Local SGD on the step's block and output module behind the frozen prefix."""
        started = time.perf_counter()
        torch.manual_seed(derive_seed("train", self.config.random_seed, plan.round, client))
        model.to(device)
        step, layout = self.step_of(plan), self.layout(model, plan)
        set_trainable(model, layout.trainable, layout.frozen_modules)
        params = [p for p in model.parameters() if p.requires_grad]
        objective = self._objective(step)
        settings = SGDSettings(
            lr=plan.lr, momentum=self.config.momentum, weight_decay=self.config.weight_decay, epochs=self.config.epochs
        )
        loss, samples = local_sgd(params, batches, lambda x, y: objective(model, x, y), settings, device)
        release(model)
        return LocalResult(
            tensors=copy_state(model, layout.upload),
            samples=samples,
            train_loss=loss,
            flops=round(self._flops_per_sample(model, plan, batches) * samples),
            compute_s=time.perf_counter() - started,
        )

    def _flops_per_sample(self, model: StagedModel, plan: RoundPlan, batches: Iterable) -> float:
        index = int(plan.details["step"])
        if index not in self._flops:
            x, y = next(iter(batches))
            probe = self.memory_probe(model, plan)
            self._flops[index] = float(train_flops(model, probe.prepare, probe.objective, x[:1], y[:1]))
        return self._flops[index]

    def memory_probe(self, model: StagedModel, plan: RoundPlan) -> MemoryProbe:
        step, layout = self.step_of(plan), self.layout(model, plan)
        return MemoryProbe(
            key=step.label,
            prepare=lambda probe: set_trainable(probe, layout.trainable, layout.frozen_modules),
            keep_modules=step.modules,
            objective=self._objective(step),
        )

    def evaluated(self, model: StagedModel, plan: RoundPlan):
        step = self.step_of(plan)
        return nullcontext(Path(model, step.path, len(step.path)))

    # ------------------------------------------------------------------ server

    def server_update(self, state: ServerState, plan: RoundPlan, updates: Sequence[ClientUpdate]) -> None:
        """Average the trained block and output module, track the block's movement, freeze when it settles."""
        merge_updates(state, self.layout(state.model, plan).upload, updates)
        state.round += 1
        self._track(state)

    def skip_round(self, state: ServerState, plan: RoundPlan) -> None:
        state.round += 1

    def _tracked_vector(self, state: ServerState) -> torch.Tensor:
        step = self.steps[int(state.extra["step"])]
        model_state = state.model.state_dict()
        flat = torch.cat([model_state[n].detach().reshape(-1).float().cpu() for n in names_under(state.model, (step.tracked,))
                          if n in parameter_names(state.model)])
        return flat[state.extra_tensors["em/indices"]]

    def _start_tracking(self, state: ServerState) -> None:
        """Fix the step's sample of scalars (once per step, seeded) and record the starting point."""
        index = int(state.extra["step"])
        step = self.steps[index]
        size = sum(state.model.state_dict()[n].numel() for n in names_under(state.model, (step.tracked,))
                   if n in parameter_names(state.model))
        rng = np.random.default_rng(derive_seed("profl-em", self.config.random_seed, index))
        count = min(size, self.p.em_sample)
        indices = np.sort(rng.choice(size, count, replace=False)) if count < size else np.arange(size)
        state.extra_tensors["em/indices"] = torch.from_numpy(indices.astype(np.int64))
        state.extra_tensors["em/trajectory"] = self._tracked_vector(state).unsqueeze(0)
        state.extra.update(step_start=state.round, low=0, em=None)

    def _track(self, state: ServerState) -> None:
        """Record the block's sampled scalars; end the step when EM settles or the step hits its cap."""
        trajectory = torch.cat([state.extra_tensors["em/trajectory"], self._tracked_vector(state).unsqueeze(0)])
        window = self.p.em_window
        state.extra_tensors["em/trajectory"] = trajectory[-(window + 1):]
        rounds = state.round - int(state.extra["step_start"])
        em = effective_movement(list(trajectory), window) if len(trajectory) >= window + 1 else None
        state.extra["em"] = em
        state.extra["em_history"] = [*state.extra.get("em_history", []), [state.round - 1, int(state.extra["step"]), em]]
        if int(state.extra["step"]) == len(self.steps) - 1:
            return  # the last step takes the remaining rounds
        if em is not None and rounds >= self.p.min_rounds:
            state.extra["low"] = int(state.extra["low"]) + 1 if em < self.p.em_threshold else 0
        if int(state.extra["low"]) >= self.p.em_patience:
            self._end_step(state, f"EM below {self.p.em_threshold} for {self.p.em_patience} rounds")
        elif rounds >= self.max_rounds:
            self._end_step(state, f"reached profl_max_rounds_per_step ({self.max_rounds})")

    def _end_step(self, state: ServerState, reason: str) -> None:
        """The one place where a block freezes and the next step starts."""
        index = int(state.extra["step"])
        step = self.steps[index]
        entry = {"step": index, **{k: v for k, v in asdict(step).items() if k in ("phase", "block")},
                 "start": int(state.extra["step_start"]), "rounds": state.round - int(state.extra["step_start"]),
                 "reason": reason}
        state.extra["log"] = [*state.extra["log"], entry]
        log.info("round %d: %s ends after %d rounds (%s); %s starts", state.round, step.label, entry["rounds"],
                 reason, self.steps[index + 1].label)
        state.extra["step"] = index + 1
        self._start_tracking(state)

    def ledger_columns(self, state: ServerState, plan: RoundPlan) -> dict[str, Any]:
        step = self.step_of(plan)
        # the EM of the round just aggregated (the history keeps it when that round ended its step)
        history = state.extra.get("em_history", [])
        em = history[-1][2] if history and history[-1][0] == plan.round else None
        return {"phase": step.phase, "step": int(plan.details["step"]), "block": step.block,
                "objective": step.objective, "em": float("nan") if em is None else em}

    def final_state(self, model: StagedModel) -> dict[str, torch.Tensor]:
        """The original architecture's weights: output modules (basic layers) are not part of it."""
        return {k: v for k, v in model.state_dict().items() if not k.startswith("basic.")}
