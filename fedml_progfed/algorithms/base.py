"""The algorithm protocol: server state, a plan per round, a layout, a client update, a server update.

Every algorithm is one module that reads end to end with no FedML import
(DESIGN.md, "the algorithm protocol"; FedJAX's init/apply over explicit state is
the model). The engine (:mod:`fedml_progfed.engine`) drives it as a **template
round**, the way Flower documents its ``Strategy``:

1. ``start_round(state, untrainable)`` (server): prepare ``state`` for round
   ``state.round`` and return its :class:`RoundPlan`. Growth or a step change
   happens here and only here, before the round's broadcast. ``untrainable(plan)``
   says why no client could train a plan (memory budgets), or ``None``.
2. ``layout(model, plan)`` (both sides, **once per round each**): the names the
   plan runs, trains, uploads and derives from the seed. The server keeps it in the
   round's :class:`Assignment` of each client; a client rebuilds its assignment once
   from the broadcast header.
3. ``objective(model, plan)``: the loss local training minimises; the engine's
   :meth:`Algorithm.client_update` runs local SGD on it over the layout's trainable set.
4. ``server_update(state, plan, layout, updates)`` (server): aggregate checked
   updates, step the server optimizer, decide freezing. The engine advances
   ``state.round`` afterwards; algorithms never do.
5. ``scored(model, plan)``: the module the server tests after the round (before the
   next round's growth, so nothing is rewound).
6. ``report(state, plan, batch)``: the algorithm's ``metrics.csv`` columns of a round
   (and, given a batch, its diagnostics).

Plus ``prepare_model(model)`` (what every party adds to a freshly built model) and
``init_state(model)``: eight hooks, with defaults here. Three more serve methods whose
clients train different sub-models in one round: ``variants`` (the plans a client may get,
costliest first, each client the first its memory fits), ``client_model`` (a narrower copy
to train, HeteroFL) and ``extra_scored`` (further modules the server tests). Messages, codecs,
validation and the ledger are the engine's business; an algorithm sees tensors by name.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Iterable, Mapping, Protocol, Sequence

import torch
from torch import nn

from fedml_progfed.core.flops import train_flops
from fedml_progfed.core.ledger import Ledger
from fedml_progfed.core.local_sgd import SGDSettings, local_sgd
from fedml_progfed.core.private_sgd import PrivateSGDSettings, PrivateSteps, private_local_sgd
from fedml_progfed.core.seeding import derive_seed
from fedml_progfed.core.server_optim import ServerOptimizer, ServerOptimizerSettings, weighted_mean
from fedml_progfed.core.staged_model import (
    StagedModel, active_names, copy_state, load_state, parameter_names, release, set_trainable, state_shapes,
)
from fedml_progfed.core.width import covered_mean
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.privacy import ClientLevelDP, RecordLevelDP


@dataclass(frozen=True)
class TrainingSettings:
    """The shared training settings every algorithm reads (FedML's ``train_args`` and the run seed).

    Attributes
    ----------
    rounds
        ``comm_round``.
    sgd
        Local SGD at the clients' base learning rate (a round's plan sets the rate it uses).
    seed
        The run seed.
    lr_schedule, lr_min, lr_restart_at_growth
        The clients' learning-rate decay over the run.
    server
        The server optimizer (FedAvg, FedProx's server side, FedAdam).
    """

    rounds: int
    sgd: SGDSettings
    seed: int = 0
    lr_schedule: str = "constant"
    lr_min: float = 0.0
    lr_restart_at_growth: bool = False
    server: ServerOptimizerSettings = field(default_factory=ServerOptimizerSettings)
    #: Record-level DP-SGD inside every client (``dp_solution_type: sample``); ``None``: plain SGD.
    private: PrivateSGDSettings | None = None


@dataclass(frozen=True)
class RoundPlan:
    """What one round trains, as decided by the server.

    Attributes
    ----------
    round
        The round index (from 0).
    stage
        The active stage of the staged model (ProgFed's ``s``).
    lr
        The clients' learning rate this round.
    warmup
        Only the entering modules train (ProgFed warm-up).
    participants
        Data-silo indices that train this round, or ``None`` to let the runtime's
        client sampling decide (FedML's rule).
    details
        Algorithm-specific fields (ProFL's phase and step, ...); JSON values only.
    """

    round: int
    stage: int
    lr: float
    warmup: bool = False
    participants: tuple[int, ...] | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def tag(self) -> dict[str, Any]:
        """The JSON-able fields the broadcast header carries."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["participants"] = None if self.participants is None else list(self.participants)
        out["details"] = dict(self.details)
        return out

    @classmethod
    def from_tag(cls, tag: Mapping[str, Any], what: str = "broadcast") -> "RoundPlan":
        """Rebuild a plan from a header's tag; a malformed tag is an :class:`InvalidUpdateError`."""
        try:
            participants = tag.get("participants")
            return cls(
                round=_int(tag["round"]),
                stage=_int(tag["stage"]),
                lr=float(tag["lr"]),
                warmup=bool(tag.get("warmup", False)),
                participants=None if participants is None else tuple(_int(p) for p in participants),
                details=dict(tag.get("details", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidUpdateError(f"{what}: the plan tag is malformed ({exc})") from None


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    return value


@dataclass(frozen=True)
class Layout:
    """The names a plan touches, from the model's structure.

    Attributes
    ----------
    label
        A human name of the sub-model (``stage 2 warm-up``, ``grow 1``): the key of its
        memory and FLOP measurements.
    modules
        Module prefixes the round runs, in order.
    active
        State keys of the sub-model the round runs.
    trainable
        Parameter names the clients train.
    upload
        State keys the clients send back (trainable parameters and the buffers
        that change with them).
    frozen_modules
        Module prefixes whose normalisation statistics stay fixed.
    entering
        Module names that entered the model this round (growth), if any.
    seeded
        Modules clients derive from the shared seed instead of receiving them.
    narrow
        Shapes of the tensors the plan narrows (HeteroFL widths): each travels, trains and is
        merged as the leading slice of that shape of the global tensor. A name not here has
        the model's own shape.
    """

    label: str
    modules: tuple[str, ...]
    active: tuple[str, ...]
    trainable: tuple[str, ...]
    upload: tuple[str, ...]
    frozen_modules: tuple[str, ...] = ()
    entering: tuple[str, ...] = ()
    seeded: tuple[str, ...] = ()
    narrow: Mapping[str, tuple[int, ...]] = field(default_factory=dict, hash=False, compare=False)

    @property
    def sent(self) -> tuple[str, ...]:
        """State keys a broadcast carries: the active ones not derived from the seed."""
        prefixes = tuple(m + "." for m in self.seeded)
        return tuple(n for n in self.active if not n.startswith(prefixes)) if prefixes else self.active


@dataclass(frozen=True)
class Assignment:
    """What one client does in a round: the plan it follows, the names it runs, trains and uploads.

    In ProgFed every participant has the same assignment; the protocol does not assume it
    (HeteroFL widths and DepthFL depths give each client the sub-model its memory fits).
    """

    plan: RoundPlan
    layout: Layout


@dataclass(frozen=True)
class MemoryProbe:
    """How to measure one training step of an assignment (:func:`fedml_progfed.core.memory.measure_step`)."""

    key: str
    prepare: Callable[[nn.Module], None]
    keep_modules: tuple[str, ...]
    objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LocalResult:
    """What a client's local training produced."""

    tensors: Mapping[str, torch.Tensor]
    samples: int
    train_loss: float
    flops: int
    compute_s: float
    private: PrivateSteps | None = None  # what DP-SGD did, when the run trains privately


@dataclass
class ClientUpdate:
    """A checked update as the server's algorithm sees it: changes by name plus measurements."""

    client: int
    weight: float  # the aggregation weight: the sample count, or 1 for uniform averaging
    deltas: Mapping[str, torch.Tensor]
    samples: float
    train_loss: float
    flops: int
    compute_s: float
    nbytes: int
    train_samples: float = math.nan  # samples the client reports it processed (epochs included)


class AlgorithmState(Protocol):
    """What an algorithm keeps across rounds beyond the model (ProFL's step, EM trajectory, ...)."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None: ...


class ServerState:
    """Everything a restart needs (DESIGN.md, "server state").

    Parameters
    ----------
    model
        The global model; every module (inactive heads and output modules too) is state.
    optimizer
        The server optimizer with its per-name moments.
    algorithm
        The algorithm's own typed state, if it keeps any.
    """

    def __init__(self, model: StagedModel, optimizer: ServerOptimizer, algorithm: AlgorithmState | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.round = 0
        self.ledger = Ledger()
        self.algorithm = algorithm
        #: Client-level DP (``dp_args``): the merge becomes its noised mean; ``None`` without DP.
        self.privacy: ClientLevelDP | None = None
        #: Record-level DP-SGD: each client's epsilon (``dp_solution_type: sample``); ``None`` otherwise.
        self.record_privacy: RecordLevelDP | None = None

    def algorithm_summary(self) -> dict[str, Any]:
        """The algorithm state's JSON part (``summary.json``'s ``algorithm_state``)."""
        return self.algorithm.state_dict()[1] if self.algorithm is not None else {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able metadata): weights and optimizer moments by name, the rest as JSON."""
        tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        opt_tensors, opt_meta = self.optimizer.state_dict()
        tensors.update({f"optimizer/{k}": v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
        extra_tensors, extra = self.algorithm.state_dict() if self.algorithm is not None else ({}, {})
        tensors.update({f"extra/{k}": v.detach().cpu().contiguous() for k, v in extra_tensors.items()})
        meta = {
            "round": self.round,
            "stage": self.model.stage,
            "optimizer": opt_meta,
            "ledger": self.ledger.state_dict(),
            "extra": extra,
        }
        if self.privacy is not None:
            meta["privacy"] = self.privacy.state_dict()
        if self.record_privacy is not None:
            meta["record_privacy"] = self.record_privacy.state_dict()
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        own = self.model.state_dict()
        model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        if set(model_state) != set(own):
            raise ValueError("the checkpoint's model does not match this run's model (different model_args?)")
        self.model.load_state_dict(model_state)
        self.model.stage = int(meta["stage"])
        self.optimizer.load_state_dict(
            {k[len("optimizer/"):]: v for k, v in tensors.items() if k.startswith("optimizer/")}, meta["optimizer"]
        )
        self.round = int(meta["round"])
        self.ledger.load_state_dict(meta["ledger"])
        if self.privacy is not None:
            if "privacy" not in meta:
                raise ValueError("the checkpoint is of a run without DP; resume it without enable_dp")
            self.privacy.load_state_dict(meta["privacy"])
        if self.record_privacy is not None:
            if "record_privacy" not in meta:
                raise ValueError("the checkpoint is of a run without record-level DP; resume it with the same dp_args")
            self.record_privacy.load_state_dict(meta["record_privacy"])
        if self.algorithm is not None:
            self.algorithm.load_state_dict(
                {k[len("extra/"):]: v.clone() for k, v in tensors.items() if k.startswith("extra/")}, meta["extra"]
            )


def merge_updates(state: ServerState, names: Sequence[str], updates: Sequence[ClientUpdate]) -> None:
    """Apply the weighted mean of the clients' changes to ``names`` (ProgFed Alg. 1 line 27).

    Parameters take the server optimizer's step (FedAvg, FedAdam, ...); buffers such as
    BatchNorm statistics are averaged, not optimised, and integer buffers are rounded. With
    client-level DP the mean is the noised sum of the clipped changes over the round's fixed
    denominator (:meth:`~fedml_progfed.privacy.ClientLevelDP.noised_mean`); the optimizer's step
    on it is post-processing.
    """
    if state.privacy is None:
        mean = weighted_mean([(u.weight, u.deltas) for u in updates], names)
    else:
        device = next(state.model.parameters()).device
        noised = state.privacy.noised_mean(state.round, names, [(u.client, u.deltas) for u in updates],
                                           state_shapes(state.model))
        mean = {n: t.to(device) for n, t in noised.items()}
    _apply_mean(state, names, mean)


def merge_covered(state: ServerState, names: Sequence[str], updates: Sequence[ClientUpdate]) -> None:
    """:func:`merge_updates` for clients that trained different parts of the model.

    Each element of each tensor takes the weighted mean of the changes of the clients whose
    update covers it (the name at all, and a narrow leading slice reaching that far): a slice
    one client trained takes that client's change, not an average with zeros, and an element
    nobody trained keeps its value (HeteroFL Sec. 3.2; DepthFL Sec. 3.1).
    """
    contributions = [(u.weight, u.deltas) for u in updates]
    current = state.model.state_dict()
    mean = covered_mean(state_shapes(state.model), names, contributions)
    covered = {}
    for name in names:
        mask = torch.zeros(current[name].shape, dtype=torch.bool, device=current[name].device)
        for update in updates:
            if name in update.deltas:
                mask[tuple(slice(0, d) for d in update.deltas[name].shape)] = True
        covered[name] = mask
    # A server optimizer with moments (FedAdam) would move a zero change; nobody's element stays as it was.
    _apply_mean(state, names, {n: t.to(current[n].device) for n, t in mean.items()}, covered)


def _apply_mean(state: ServerState, names: Sequence[str], mean_delta: Mapping[str, torch.Tensor],
                covered: Mapping[str, torch.Tensor] | None = None) -> None:
    """Step the server optimizer on the parameters' mean change; add it to the buffers.

    ``covered``: per name, the elements some client trained; the others keep their value.
    """
    model = state.model
    parameters = parameter_names(model)
    current = model.state_dict()
    trained = [k for k in names if k in parameters]
    stepped = state.optimizer.step({k: current[k].float() for k in trained}, {k: mean_delta[k] for k in trained})
    averaged = {k: current[k].float() + mean_delta[k] for k in names if k not in parameters}
    merged = {
        k: (v if current[k].is_floating_point() else v.round()).to(current[k].dtype)
        for k, v in {**stepped, **averaged}.items()
    }
    if covered is not None:
        merged = {k: torch.where(covered[k], v, current[k]) for k, v in merged.items()}
    load_state(model, merged, names, what="aggregate")


#: ``objective(model, x, y) -> loss`` of one batch.
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``untrainable(plan) -> reason`` no client can train ``plan``, or ``None`` (see :meth:`Algorithm.start_round`).
Untrainable = Callable[[RoundPlan], "str | None"]


def prepare(model: StagedModel, assignment: Assignment) -> None:
    """Bring ``model`` to the assignment's sub-model with only its trainable set requiring gradients."""
    model.stage = assignment.plan.stage
    set_trainable(model, assignment.layout.trainable, assignment.layout.frozen_modules)


class Algorithm(ABC):
    """One federated algorithm over a staged model (see the module docstring for the template round).

    Subclasses set :attr:`name`, :attr:`training`, :attr:`task` and :attr:`total_rounds`, and
    implement the abstract hooks; the others have defaults here.
    """

    name: ClassVar[str]
    #: Module prefixes the algorithm adds that are not part of the architecture a run hands over.
    auxiliary_modules: ClassVar[tuple[str, ...]] = ()
    training: TrainingSettings
    task: Any
    total_rounds: int
    #: FedProx's proximal weight on the client (0: plain local SGD).
    prox_mu: float = 0.0
    #: With several ``variants``: every client trains the costliest one that every client fits
    #: (AllSmall), instead of each client the costliest it fits (HeteroFL, DepthFL).
    shared_variant: ClassVar[bool] = False

    # ------------------------------------------------------------------ the eight hooks

    def prepare_model(self, model: StagedModel) -> None:
        """Add what the algorithm needs to a freshly built model (e.g. output modules); same on every party."""

    @abstractmethod
    def init_state(self, model: StagedModel) -> ServerState:
        """The state before round 0, built around the (seeded) global model."""

    @abstractmethod
    def start_round(self, state: ServerState, untrainable: Untrainable) -> RoundPlan:
        """Prepare ``state`` for round ``state.round`` (grow the model, move past untrainable steps) and
        return its plan; after the last round, the plan of the final broadcast (``lr`` 0, nobody trains)."""

    @abstractmethod
    def layout(self, model: StagedModel, plan: RoundPlan) -> Layout:
        """The names ``plan`` touches on ``model`` (either side)."""

    @abstractmethod
    def objective(self, model: StagedModel, plan: RoundPlan) -> Objective:
        """The loss local training of ``plan`` minimises."""

    @abstractmethod
    def server_update(self, state: ServerState, plan: RoundPlan, layout: Layout, updates: Sequence[ClientUpdate]) -> None:
        """Aggregate ``updates`` into ``state.model`` and step the optimizer (``state.round`` is still the round's)."""

    def scored(self, model: StagedModel, plan: RoundPlan) -> nn.Module:
        """The module the server tests after round ``plan.round`` (the sub-model it trained)."""
        return StageView(model, plan.stage)

    def variants(self, model: StagedModel, plan: RoundPlan) -> tuple[RoundPlan, ...]:
        """The plans a client may be given in ``plan``'s round, costliest first; one for everyone by default.

        With memory budgets each client trains the first variant its budget fits (HeteroFL's
        widths, DepthFL's depths); without budgets every client trains the first.
        """
        return (plan,)

    def client_model(self, model: StagedModel, plan: RoundPlan) -> StagedModel:
        """The model a client trains for ``plan``: ``model`` itself, or a narrower copy (HeteroFL) whose
        tensors are the leading slices the layout's ``narrow`` names. Called on the global model."""
        return model

    def extra_scored(self, model: StagedModel, plan: RoundPlan) -> Mapping[str, nn.Module]:
        """Further modules the server tests after a round, by name: their metric is the column
        ``test_metric_<name>`` (each HeteroFL width, DepthFL's ensemble). None by default."""
        return {}

    def report(self, state: ServerState, plan: RoundPlan, batch: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
        """The algorithm's ``metrics.csv`` columns of a finished round; ``batch`` asks for diagnostics too."""
        return {"phase": "", "step": float("nan"), "block": float("nan"), "em": float("nan")}

    # ------------------------------------------------------------------ shared by every algorithm

    def client_update(
        self, model: StagedModel, assignment: Assignment, batches: Iterable, device: torch.device, client: int,
        private_seed: int | None = None,
    ) -> LocalResult:
        """Local SGD on the assignment's trainable set (ProgFed Alg. 1 lines 19-24), a fresh optimizer every round.

        With :attr:`TrainingSettings.private` it is DP-SGD (Abadi et al. 2016) through Opacus, its
        noise and Poisson sampling drawn from ``private_seed`` (a seed only the client knows).
        """
        started = time.perf_counter()
        plan = assignment.plan
        # Seeding by (run, round, client) makes shuffling and dropout identical in every runtime.
        torch.manual_seed(derive_seed("train", self.training.seed, plan.round, client))
        model.to(device)
        prepare(model, assignment)
        params = [p for p in model.parameters() if p.requires_grad]
        settings = replace(self.training.sgd, lr=plan.lr, prox_mu=self.prox_mu)
        objective = self.objective(model, plan)
        private = None
        if self.training.private is None:
            loss, samples = local_sgd(params, batches, lambda x, y: objective(model, x, y), settings, device)
        else:
            if private_seed is None:
                raise ValueError("record-level DP-SGD needs the client's secret seed")
            loss, samples, private = private_local_sgd(model, params, batches, lambda x, y: objective(model, x, y),
                                                       settings, self.training.private, device, private_seed)
        release(model)
        flops = round(self._flops_per_sample(model, assignment, batches) * samples)
        return LocalResult(
            tensors=copy_state(model, assignment.layout.upload),
            samples=samples,
            train_loss=loss,
            flops=flops,
            compute_s=time.perf_counter() - started,
            private=private,
        )

    def _flops_per_sample(self, model: StagedModel, assignment: Assignment, batches: Iterable) -> float:
        """Measured once per sub-model (the layout's label) on a one-sample batch, then scaled by samples."""
        cache = self.__dict__.setdefault("_flops_cache", {})
        key = assignment.layout.label
        if key not in cache:
            x, y = next(iter(batches))
            probe = self.memory_probe(model, assignment)
            cache[key] = float(train_flops(model, probe.prepare, probe.objective, x[:1], y[:1]))
        return cache[key]

    def memory_probe(self, model: StagedModel, assignment: Assignment) -> MemoryProbe:
        """How a round of ``assignment`` trains, for measuring its peak memory and FLOPs."""
        layout = assignment.layout
        return MemoryProbe(
            key=layout.label,
            prepare=lambda probe: prepare(probe, assignment),
            keep_modules=layout.modules,
            objective=self.objective(model, assignment.plan),
        )

    def full_model_probe(self, model: StagedModel) -> MemoryProbe:
        """End-to-end training of the whole model: the reference of relative memory budgets."""
        stage = model.num_stages
        trainable = [n for n in active_names(model, stage) if n in parameter_names(model)]

        def full(probe: nn.Module) -> None:
            probe.stage = stage
            set_trainable(probe, trainable)

        return MemoryProbe("full model", full, tuple(model.stage_modules(stage)),
                           lambda probe, x, y: self.task.loss(probe(x), y))

    def final_state(self, model: StagedModel) -> dict[str, torch.Tensor]:
        """The weights a run hands over at the end: the architecture, without auxiliary modules."""
        prefixes = tuple(m + "." for m in self.auxiliary_modules)
        return {k: v for k, v in model.state_dict().items() if not (prefixes and k.startswith(prefixes))}


class StageView(nn.Module):
    """The sub-model ``M^s`` of a staged model as a module of its own (nothing of the model changes)."""

    def __init__(self, model: StagedModel, stage: int) -> None:
        super().__init__()
        self.model = model
        self.stage = model.check_stage(stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_stage(x, self.stage)
