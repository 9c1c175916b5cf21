"""Staged models and the surgery progressive training performs on them.

A staged model owns blocks ``E_1..E_S`` and heads ``G_1..G_S`` as registered
submodules; the active sub-model at stage ``s`` is ``M^s = G_s o E_s o ... o E_1``
(ProgFed, Sec. 3.1, Eq. 1-2). Everything that travels between server and clients
is addressed by full-model names. This module holds the framework-free
building blocks; *when* to use them is each algorithm's business
(:mod:`fedml_progfed.algorithms`):

* :func:`active_names` / :func:`copy_state` / :func:`load_state` address and move
  a sub-model's tensors by name (Alg. 1 line 15);
* :func:`grow` re-initialises the entering block and head from a seeded
  generator while carrying the shared blocks over (Alg. 1 lines 5-11);
* :func:`set_trainable` trains a chosen set of parameters and freezes the rest
  (Alg. 1 lines 16-18).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from fedml_progfed.core.seeding import derive_seed
from fedml_progfed.errors import ConfigError, FieldError, InvalidUpdateError


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


def forget_layout(model: nn.Module) -> None:
    """Drop the cached names and shapes after modules were added to a model."""
    for key in ("_progfed_state_shapes", "_progfed_names", "_progfed_parameter_names"):
        model.__dict__.pop(key, None)


def parameter_names(model: StagedModel) -> frozenset[str]:
    """Names of the model's parameters (not buffers), computed once per model."""
    names = model.__dict__.get("_progfed_parameter_names")
    if names is None:
        names = frozenset(name for name, _ in model.named_parameters())
        model.__dict__["_progfed_parameter_names"] = names
    return names


def names_under(model: StagedModel, prefixes: Iterable[str]) -> list[str]:
    """State-dict keys under the given module names, in model order (cached per model)."""
    return list(_names_under(model, tuple(prefixes)))


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


def copy_state(model: StagedModel, names: Sequence[str]) -> "OrderedDict[str, torch.Tensor]":
    """Detached copies of the named tensors (parameters and buffers)."""
    state = model.state_dict()
    return OrderedDict((k, state[k].detach().clone()) for k in names)


def check_names(expected: Sequence[str], entries: Mapping[str, object], what: str, fix: str) -> None:
    """Raise :class:`InvalidUpdateError` unless ``entries`` has exactly the ``expected`` names."""
    expected_set = set(expected)
    missing = [k for k in expected if k not in entries]
    extra = [k for k in entries if k not in expected_set]
    if missing or extra:
        raise InvalidUpdateError(
            f"{what}: keys do not match (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}); {fix}"
        )


def check_layout(model: StagedModel, expected: Sequence[str], state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`InvalidUpdateError` unless ``state`` has exactly the expected keys and shapes."""
    check_names(expected, state, what, "the sender must build the same model and stage as the receiver")
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


def load_state(model: StagedModel, state: Mapping[str, torch.Tensor], names: Sequence[str], what: str = "state") -> None:
    """Copy ``state[names]`` into the model after checking keys and shapes (all or nothing)."""
    check_layout(model, names, state, what)
    own = model.state_dict()
    with torch.no_grad():
        for key in names:
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


def set_trainable(model: StagedModel, trainable: Iterable[str], frozen_modules: Iterable[str] = ()) -> list[str]:
    """Train exactly the parameters ``trainable``; freeze the normalisation statistics of ``frozen_modules``.

    Every other parameter gets ``requires_grad=False`` (no gradient, no optimizer
    state). The model is put in training mode, then normalisation layers that keep
    running statistics (BatchNorm, tracked InstanceNorm) under ``frozen_modules``
    are put in eval mode so their statistics stay fixed. Dropout keeps training
    mode everywhere, as in the ProgFed reference code's warm-up.

    Returns
    -------
    list of str
        The trainable parameter names, in model order.
    """
    keep = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    model.train()
    frozen = tuple(frozen_modules)
    for name, module in model.named_modules():
        if frozen and _under(name, frozen) and isinstance(module, nn.modules.batchnorm._NormBase):
            module.eval()
    return [name for name, _ in model.named_parameters() if name in keep]


def release(model: StagedModel) -> None:
    """Undo :func:`set_trainable`: every parameter trainable again, training mode."""
    for param in model.parameters():
        param.requires_grad_(True)
    model.train()


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
        raise FieldError(
            "progfed.stages",
            f"{model_name} has {len(units)} units and can be split into 1..{len(units)} stages, got {num_stages!r}",
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
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.blocks = nn.ModuleList(blocks)
        feature_shapes = self.feature_shapes(input_shape)
        heads = [head_factory(shape, num_classes) for shape in feature_shapes[:-1]]
        self.heads = nn.ModuleList([*heads, final_head])

    def feature_shapes(self, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Each block's output shape (without the batch axis), by a dry forward of a zero batch."""
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
