"""The algorithm protocol: server state, a plan per round, a client update, a server update.

Every algorithm is one module that reads end to end with no FedML import
(DESIGN.md, "the algorithm protocol"; FedJAX's init/apply over explicit state is
the model):

* :class:`ServerState` holds everything a restart needs: the round, the global
  model (every module, inactive heads included), the server optimizer's moments,
  the ledger, and whatever the algorithm keeps (``extra``).
* :meth:`Algorithm.plan` says what a round trains. The **server decides**: the
  broadcast carries the plan's :meth:`RoundPlan.tag`, and clients rebuild the
  plan from the tag (:meth:`RoundPlan.from_tag`) instead of re-deriving a schedule.
* :meth:`Algorithm.layout` turns a plan into names (what is sent, trained,
  uploaded) on either side, from the model's structure alone.
* :meth:`Algorithm.client_update` trains locally and returns a :class:`LocalResult`.
* :meth:`Algorithm.start_round` prepares the state for a round and returns its
  plan: growth (or a step change) happens there and only there, before the
  round's broadcast.
* :meth:`Algorithm.server_update` aggregates checked updates, steps the server
  optimizer and advances the round (and decides freezing, for ProFL).

Messages, codecs, validation and the ledger are the engine's business
(:mod:`fedml_progfed.engine`); an algorithm sees tensors by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from fedml_progfed.core.ledger import Ledger
from fedml_progfed.core.server_optim import ServerOptimizer, weighted_mean
from fedml_progfed.core.staged_model import StagedModel, active_names, load_state, parameter_names, set_trainable
from fedml_progfed.errors import InvalidUpdateError


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
    active
        State keys of the sub-model the round runs (what the broadcast carries).
    trainable
        Parameter names the clients train.
    upload
        State keys the clients send back (trainable parameters and the buffers
        that change with them).
    frozen_modules
        Module prefixes whose normalisation statistics stay fixed.
    entering
        Module names that entered the model this round (growth), if any.
    """

    active: tuple[str, ...]
    trainable: tuple[str, ...]
    upload: tuple[str, ...]
    frozen_modules: tuple[str, ...] = ()
    entering: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemoryProbe:
    """How to measure one training step of a plan (:func:`fedml_progfed.core.memory.measure_step`)."""

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


class ServerState:
    """Everything a restart needs (DESIGN.md, "server state").

    Parameters
    ----------
    model
        The global model; every module (inactive heads and output modules too) is state.
    optimizer
        The server optimizer with its per-name moments.
    """

    def __init__(self, model: StagedModel, optimizer: ServerOptimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self.round = 0
        self.ledger = Ledger()
        self.extra: dict[str, Any] = {}
        self.extra_tensors: dict[str, torch.Tensor] = {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able metadata): weights and optimizer moments by name, the rest as JSON."""
        tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        opt_tensors, opt_meta = self.optimizer.state_dict()
        tensors.update({f"optimizer/{k}": v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
        tensors.update({f"extra/{k}": v.detach().cpu().contiguous() for k, v in self.extra_tensors.items()})
        meta = {
            "round": self.round,
            "stage": self.model.stage,
            "optimizer": opt_meta,
            "ledger": self.ledger.state_dict(),
            "extra": self.extra,
        }
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
        self.extra = dict(meta["extra"])
        self.extra_tensors = {k[len("extra/"):]: v.clone() for k, v in tensors.items() if k.startswith("extra/")}


def merge_updates(state: ServerState, names: Sequence[str], updates: Sequence[ClientUpdate]) -> None:
    """Apply the weighted mean of the clients' changes to ``names`` (ProgFed Alg. 1 line 27).

    Parameters take the server optimizer's step (FedAvg, FedAdam, ...); buffers such as
    BatchNorm statistics are averaged, not optimised, and integer buffers are rounded.
    """
    model = state.model
    parameters = parameter_names(model)
    current = model.state_dict()
    mean_delta = weighted_mean([(u.weight, u.deltas) for u in updates], names)
    trained = [k for k in names if k in parameters]
    stepped = state.optimizer.step({k: current[k].float() for k in trained}, {k: mean_delta[k] for k in trained})
    averaged = {k: current[k].float() + mean_delta[k] for k in names if k not in parameters}
    merged = {
        k: (v if current[k].is_floating_point() else v.round()).to(current[k].dtype)
        for k, v in {**stepped, **averaged}.items()
    }
    load_state(model, merged, names, what="aggregate")


class Algorithm(ABC):
    """One federated algorithm over a staged model (see the module docstring).

    Subclasses set :attr:`name` and implement the abstract methods; the engine
    calls them in this order each round: ``start_round`` -> (clients)
    ``prepare_client``, ``client_update`` -> ``server_update``.
    """

    name: ClassVar[str]

    def prepare_model(self, model: StagedModel) -> None:
        """Add what the algorithm needs to a freshly built model (e.g. output modules); same on every party."""

    @property
    @abstractmethod
    def total_rounds(self) -> int:
        """Rounds the run executes (what FedML's ``comm_round`` must be)."""

    @abstractmethod
    def init_state(self, model: StagedModel) -> ServerState:
        """The state before round 0, built around the (seeded) global model."""

    @abstractmethod
    def plan(self, state: ServerState) -> RoundPlan:
        """What round ``state.round`` trains."""

    def final_plan(self, state: ServerState) -> RoundPlan:
        """The plan tag of the broadcast after the last round (the final model; nobody trains)."""
        return RoundPlan(round=state.round, stage=state.model.stage, lr=0.0)

    def start_round(self, state: ServerState) -> RoundPlan:
        """Prepare ``state`` for round ``state.round`` (e.g. grow the model) and return its plan."""
        return self.plan(state)

    @abstractmethod
    def layout(self, model: StagedModel, plan: RoundPlan) -> Layout:
        """The names ``plan`` touches on ``model`` (either side)."""

    def seeded_modules(self, state: ServerState, plan: RoundPlan) -> tuple[str, ...]:
        """Modules of the broadcast that clients derive from the shared seed instead of receiving."""
        return ()

    def prepare_client(self, model: StagedModel, plan: RoundPlan, seeded: Sequence[str]) -> None:
        """Bring a client's model to the plan's sub-model before the broadcast is loaded."""
        model.stage = model.check_stage(plan.stage)

    @abstractmethod
    def client_update(
        self, model: StagedModel, plan: RoundPlan, batches: Iterable, device: torch.device, client: int
    ) -> LocalResult:
        """Local training of ``plan`` on ``batches`` by data silo ``client``."""

    @abstractmethod
    def server_update(self, state: ServerState, plan: RoundPlan, updates: Sequence[ClientUpdate]) -> None:
        """Aggregate ``updates`` into ``state.model``, step the optimizer, advance ``state.round``."""

    @contextmanager
    def evaluated(self, model: StagedModel, plan: RoundPlan) -> Iterator[StagedModel]:
        """``model`` set up to run the sub-model ``plan`` trained (the server tests it after the round).

        The next round's broadcast may already have grown the model when the server
        tests (FedML builds it in ``aggregate``); trained modules are kept, so the
        round's own sub-model is still there to score.
        """
        current = model.stage
        model.stage = model.check_stage(plan.stage)
        try:
            yield model
        finally:
            model.stage = current

    def skip_round(self, state: ServerState, plan: RoundPlan) -> None:
        """A round in which no client trained: the model stays, the round passes."""
        state.round += 1

    def skip_step(self, state: ServerState, plan: RoundPlan, reason: str) -> bool:
        """Move past a plan no client can train; False when there is nothing to move to."""
        return False

    def memory_probe(self, model: StagedModel, plan: RoundPlan) -> MemoryProbe:
        """How a round of ``plan`` trains, for measuring its peak memory (the stage's sub-model)."""
        layout = self.layout(model, plan)
        stage = plan.stage

        def prepare(probe: nn.Module) -> None:
            probe.stage = stage
            set_trainable(probe, layout.trainable, layout.frozen_modules)

        return MemoryProbe(
            key=f"stage {stage}" + (" warm-up" if plan.warmup else ""),
            prepare=prepare,
            keep_modules=tuple(model.stage_modules(stage)),
            objective=lambda probe, x, y: self.task.loss(probe(x), y),
        )

    def full_model_probe(self, model: StagedModel) -> MemoryProbe:
        """End-to-end training of the whole model: the reference of relative memory budgets."""
        stage = model.num_stages
        trainable = [n for n in active_names(model, stage) if n in parameter_names(model)]

        def prepare(probe: nn.Module) -> None:
            probe.stage = stage
            set_trainable(probe, trainable)

        return MemoryProbe("full model", prepare, tuple(model.stage_modules(stage)),
                           lambda probe, x, y: self.task.loss(probe(x), y))

    def diagnose(self, model: StagedModel, plan: RoundPlan, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Optional per-test-round diagnostics of the algorithm (ProgFed: the norm discrepancy q_t)."""
        return {}

    def final_state(self, model: StagedModel) -> dict[str, torch.Tensor]:
        """The weights a run hands over at the end (the whole model by default)."""
        return dict(model.state_dict())

    def ledger_columns(self, state: ServerState, plan: RoundPlan) -> dict[str, Any]:
        """Algorithm-specific ``metrics.csv`` columns of a round (ProFL's phase, step, block, EM)."""
        return {"phase": "", "step": float("nan"), "block": float("nan"), "em": float("nan")}
