"""Staged models and the surgery ProgFed performs on them.

A staged model owns blocks ``E_1..E_S`` and heads ``G_1..G_S`` as registered
submodules; the active sub-model at stage ``s`` is ``M^s = G_s o E_s o ... o E_1``
(ProgFed, Sec. 3.1, Eq. 1-2). Everything that travels between server and clients
is addressed by full-model names, so "what happens when the model grows" lives
here and nowhere else:

* :func:`active_state` / :func:`load_active_state` extract and merge the active
  sub-model's parameters by name (Alg. 1 line 15);
* :func:`grow` re-initialises the entering block and head from a seeded
  generator while carrying the shared blocks over (Alg. 1 lines 5-11);
* :func:`trainable_names` is the set trained in a round, old blocks frozen
  during warm-up (Alg. 1 lines 16-18).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from fedml_progfed.core.seeding import derive_seed
from fedml_progfed.errors import ConfigError, InvalidUpdateError

class StagedModel(nn.Module, ABC):
    """A network whose forward pass depends on the active stage.

    Subclasses say which submodules are active at a stage and which enter at a
    stage; the functions of this module do the rest. ``stage`` is a plain
    attribute (not state): it is part of every message, not of the weights.
    """

    def __init__(self, num_stages: int) -> None:
        super().__init__()
        if num_stages < 1:
            raise ConfigError(f"num_stages must be >= 1, got {num_stages}")
        self.num_stages = num_stages
        self.stage = num_stages

    @abstractmethod
    def stage_modules(self, stage: int) -> tuple[str, ...]:
        """Dotted names of the submodules that form the sub-model ``M^stage``."""

    @abstractmethod
    def new_modules(self, stage: int) -> tuple[str, ...]:
        """Dotted names of the submodules that enter the model at ``stage``."""

    @abstractmethod
    def forward_stage(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Run the sub-model ``M^stage`` on ``x``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stage(x, self.stage)

    def check_stage(self, stage: int) -> int:
        if not isinstance(stage, int) or not 1 <= stage <= self.num_stages:
            raise InvalidUpdateError(
                f"stage {stage!r} does not exist: this model has stages 1..{self.num_stages}"
            )
        return stage


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def state_shapes(model: StagedModel) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes, computed once per model.

    The layout never changes after construction (``.to()`` moves tensors, not names or
    shapes), and building a ``state_dict`` on every call was the simulator's largest
    overhead. Only names and shapes are cached, never tensors.
    """
    layout = model.__dict__.get("_progfed_state_shapes")
    if layout is None:
        layout = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        model.__dict__["_progfed_state_shapes"] = layout
    return layout


def _names_under(model: StagedModel, prefixes: tuple[str, ...]) -> list[str]:
    cache = model.__dict__.setdefault("_progfed_names", {})
    if prefixes not in cache:
        cache[prefixes] = [name for name in state_shapes(model) if _under(name, prefixes)]
    return cache[prefixes]


def active_names(model: StagedModel, stage: int) -> list[str]:
    """State-dict keys (parameters and buffers) of the sub-model ``M^stage``, in model order."""
    return list(_names_under(model, model.stage_modules(model.check_stage(stage))))


def new_names(model: StagedModel, stage: int) -> list[str]:
    """State-dict keys of the submodules that enter at ``stage``."""
    return list(_names_under(model, model.new_modules(model.check_stage(stage))))


def upload_names(model: StagedModel, stage: int, warmup: bool) -> list[str]:
    """Keys a client sends back: only the entering modules during warm-up, else all active keys.

    Frozen blocks do not change during warm-up (their parameters get no gradient and
    their normalisation statistics are held in eval mode), so sending them would
    only cost bytes.
    """
    return new_names(model, stage) if warmup and stage > 1 else active_names(model, stage)


def trainable_names(model: StagedModel, stage: int, warmup: bool) -> list[str]:
    """Parameter names trained at ``stage``; during warm-up only the entering ones (Alg. 1 l. 16-18)."""
    keys = set(upload_names(model, stage, warmup))
    return [name for name, _ in model.named_parameters() if name in keys]


def active_state(model: StagedModel, stage: int, names: Sequence[str] | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Detached copies of the sub-model's tensors by full-model name."""
    state = model.state_dict()
    keys = active_names(model, stage) if names is None else names
    return OrderedDict((k, state[k].detach().clone()) for k in keys)


def check_state(
    model: StagedModel, expected: Sequence[str], state: Mapping[str, torch.Tensor], what: str, check_values: bool = True
) -> None:
    """Raise :class:`InvalidUpdateError` unless ``state`` has exactly the expected keys and shapes.

    Nothing is modified; callers check every incoming state before merging any.
    """
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in set(expected)]
    if missing or extra:
        raise InvalidUpdateError(
            f"{what}: keys do not match the sub-model (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}); the sender must build the same "
            f"model and stage as the server"
        )
    reference = state_shapes(model)
    for key in expected:
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise InvalidUpdateError(f"{what}: {key} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != reference[key]:
            raise InvalidUpdateError(
                f"{what}: {key} has shape {tuple(value.shape)}, the model has {reference[key]}; "
                f"check that both sides use the same model_args and input shape"
            )
        if check_values and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InvalidUpdateError(
                f"{what}: {key} contains NaN or Inf; lower the learning rate or check the client's data"
            )


def load_active_state(
    model: StagedModel,
    stage: int,
    state: Mapping[str, torch.Tensor],
    names: Sequence[str] | None = None,
    check_values: bool = True,
) -> None:
    """Copy ``state`` into the sub-model after checking keys and shapes (all or nothing).

    ``check_values=False`` skips the finite-value scan for states the caller computed
    itself from checked inputs (it is the costliest part of the check).
    """
    keys = active_names(model, stage) if names is None else list(names)
    check_state(model, keys, state, what=f"state for stage {stage}", check_values=check_values)
    own = model.state_dict()
    with torch.no_grad():
        for key in keys:
            own[key].copy_(state[key].to(device=own[key].device, dtype=own[key].dtype))


def init_stage_modules(model: StagedModel, stage: int, seed: int) -> None:
    """Initialise the modules entering at ``stage`` from a generator seeded by (seed, stage, name).

    Initialisation runs on a CPU copy under a forked RNG, so the result does not
    depend on the device, on the global RNG, or on what happened before.
    """
    for name in model.new_modules(model.check_stage(stage)):
        module = model.get_submodule(name)
        fresh = copy.deepcopy(module).to("cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed("init", seed, stage, name))
            for sub in fresh.modules():
                reset = getattr(sub, "reset_parameters", None)
                if callable(reset):
                    reset()
                reset_stats = getattr(sub, "reset_running_stats", None)
                if callable(reset_stats):
                    reset_stats()
        with torch.no_grad():
            for target, source in zip(module.state_dict().values(), fresh.state_dict().values()):
                target.copy_(source)


def initialize(model: StagedModel, seed: int) -> StagedModel:
    """Seeded initialisation of every stage's modules; sets the model to stage 1.

    End-to-end and progressive runs with the same seed start from identical
    weights for every module, because growth re-uses the same per-stage seeds.
    """
    for stage in range(1, model.num_stages + 1):
        init_stage_modules(model, stage, seed)
    model.stage = 1
    return model


def grow(model: StagedModel, to_stage: int, seed: int) -> list[str]:
    """Grow ``model`` from its current stage to ``to_stage`` (Alg. 1 lines 5-11).

    Blocks shared with the current sub-model are carried over untouched; each
    entering block and head is initialised from the seeded generator; the old
    head simply leaves the active set (it is no longer trained nor sent).

    Returns
    -------
    list of str
        Names of the modules that entered.
    """
    to_stage = model.check_stage(to_stage)
    if to_stage < model.stage:
        raise InvalidUpdateError(
            f"cannot shrink from stage {model.stage} to {to_stage}: progressive training only grows"
        )
    entered: list[str] = []
    for stage in range(model.stage + 1, to_stage + 1):
        init_stage_modules(model, stage, seed)
        entered.extend(model.new_modules(stage))
    model.stage = to_stage
    return entered


def set_trainable(model: StagedModel, stage: int, warmup: bool) -> list[str]:
    """Freeze every parameter outside the round's trainable set; put frozen modules in eval mode.

    Returns the trainable parameter names.
    """
    names = trainable_names(model, stage, warmup)
    keep = set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    model.train()
    if warmup and stage > 1:
        entering = model.new_modules(stage)
        for name, module in model.named_modules():
            if name and _under(name, model.stage_modules(stage)) and not _under(name, entering):
                if not any(True for _ in module.children()):
                    module.eval()
    return names


def count_parameters(model: StagedModel, stage: int) -> int:
    """Number of trainable parameters (not buffers) in the sub-model ``M^stage``."""
    prefixes = model.stage_modules(model.check_stage(stage))
    return sum(p.numel() for n, p in model.named_parameters() if _under(n, prefixes))


# --------------------------------------------------------------------------- feed-forward networks


def pooled_linear_head(feature_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The paper's light temporary head: global average pooling + one linear layer (Sec. 3.1)."""
    channels, *spatial = feature_shape
    if not spatial:
        return nn.Linear(channels, num_classes)
    pools = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
    return nn.Sequential(pools[len(spatial)](1), nn.Flatten(), nn.Linear(channels, num_classes))


def group_units(units: Sequence[nn.Module], num_stages: int, model_name: str) -> list[nn.Module]:
    """Group a network's units into ``num_stages`` blocks, merging the front units into ``E_1``.

    This reproduces every split of the paper (App. B): VGG's first two pooling
    groups form ``E_1``, ResNet's conv1 + conv2_x form ``E_1``, ConvNets use one
    layer per block.
    """
    if not isinstance(num_stages, int) or not 1 <= num_stages <= len(units):
        raise ConfigError(
            f"progfed_args.progfed_stages: {model_name} has {len(units)} units and can be split into "
            f"1..{len(units)} stages, got {num_stages!r}"
        )
    merged = len(units) - num_stages + 1
    first = units[0] if merged == 1 else nn.Sequential(*units[:merged])
    return [first, *units[merged:]]


class SequentialStagedModel(StagedModel):
    """``M^s = G_s o E_s o ... o E_1`` for feed-forward networks (Eq. 2).

    Parameters
    ----------
    blocks
        ``E_1..E_S`` in order.
    final_head
        The network's own classifier ``G_S``.
    input_shape
        Shape of one input sample, used once to size the temporary heads.
    num_classes
        Output size of every head.
    head_factory
        Builds ``G_s`` for ``s < S`` from the feature shape after ``E_s``.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        final_head: nn.Module,
        input_shape: Sequence[int],
        num_classes: int,
        head_factory: Callable[[Sequence[int], int], nn.Module] = pooled_linear_head,
    ) -> None:
        super().__init__(num_stages=len(blocks))
        self.blocks = nn.ModuleList(blocks)
        feature_shapes = self._feature_shapes(input_shape)
        heads = [head_factory(shape, num_classes) for shape in feature_shapes[:-1]]
        self.heads = nn.ModuleList([*heads, final_head])

    def _feature_shapes(self, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
        shapes = []
        was_training = self.training
        self.eval()
        with torch.no_grad():
            x = torch.zeros(2, *input_shape)
            for block in self.blocks:
                x = block(x)
                shapes.append(tuple(x.shape[1:]))
        self.train(was_training)
        return shapes

    def stage_modules(self, stage: int) -> tuple[str, ...]:
        return (*(f"blocks.{i}" for i in range(stage)), f"heads.{stage - 1}")

    def new_modules(self, stage: int) -> tuple[str, ...]:
        return (f"blocks.{stage - 1}", f"heads.{stage - 1}")

    def forward_stage(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        # Index, not slice: slicing a ModuleList builds a new Module on every forward pass.
        for index in range(stage):
            x = self.blocks[index](x)
        return self.heads[stage - 1](x)
