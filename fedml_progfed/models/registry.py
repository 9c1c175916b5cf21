"""Name -> architecture table of the staged models (ProgFed Sec. 4.1, App. B), with what each supports.

Each architecture module registers its builder with :func:`register_model`,
giving the number of stages ``S`` the paper uses for it and its capabilities
(e.g. :data:`PROFL`: ProFL can split it into blocks with basic layers), so an
algorithm asks :func:`models_with` instead of keeping its own list.
:func:`build_model` is the only way the rest of the package turns
the ``model`` field into a :class:`~fedml_progfed.core.staged_model.StagedModel`;
it records how on the model (:class:`BuildSpec`), so :func:`narrow_copy` can build the
same architecture at a smaller width (:data:`WIDTH`, HeteroFL).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from fedml_progfed.core.registry import Registry, UnknownNameError
from fedml_progfed.core.staged_model import StagedModel
from fedml_progfed.errors import FieldError

Builder = Callable[..., StagedModel]
"""``builder(input_shape, num_classes, num_stages, **options) -> StagedModel``."""

_SHAPE_NAMES = {1: "(channels, length)", 2: "(channels, height, width)", 3: "(channels, depth, height, width)"}

#: Capability: a feed-forward image model (a ``SequentialStagedModel`` on ``(C, H, W)``)
#: that ProFL splits into blocks, each with a basic layer (ProFL, KDD 2025).
PROFL = "profl"
#: Capability: the builder takes ``width_ratio`` and scales every hidden width by it, each
#: tensor of the narrow model being a leading slice of the full one (HeteroFL, ICLR 2021).
WIDTH = "width"
#: Every capability a model may declare, with what it promises.
CAPABILITIES: dict[str, str] = {
    PROFL: "feed-forward image model that ProFL splits into blocks with basic layers",
    WIDTH: "image model whose hidden widths scale by a ratio, channels nested as leading slices (HeteroFL)",
}

#: The builder option of :data:`WIDTH` models.
WIDTH_OPTION = "width_ratio"


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture.

    Attributes
    ----------
    builder : callable
        ``builder(input_shape, num_classes, num_stages, **options) -> StagedModel``.
    default_stages : int
        The paper's ``S`` for this model.
    spatial_dims : int
        Spatial axes of one sample: 2 for images ``(C, H, W)``, 3 for volumes ``(C, D, H, W)``.
    capabilities : frozenset of str
        Keys of :data:`CAPABILITIES` the model supports.
    """

    builder: Builder
    default_stages: int
    spatial_dims: int = 2
    capabilities: frozenset[str] = frozenset()


@dataclass(frozen=True)
class BuildSpec:
    """How :func:`build_model` built a model, so that a copy can be built again (:func:`narrow_copy`).

    Attributes
    ----------
    name : str
        The registered model name.
    input_shape : tuple of int
        Shape of one sample.
    num_classes : int
        Logits of every head.
    num_stages : int
        ``S`` as resolved (the default filled in).
    options : tuple of (str, object)
        The builder options given, as sorted ``(key, value)`` pairs (hashable, immutable).
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    num_stages: int
    options: tuple[tuple[str, Any], ...] = ()

    def options_dict(self) -> dict[str, Any]:
        """The options as keyword arguments for :func:`build_model`."""
        return dict(self.options)


#: Every architecture the ``model`` field can select, in registration order.
MODELS: Registry[ModelEntry] = Registry("model")


def register_model(
    name: str, default_stages: int, spatial_dims: int = 2, capabilities: Iterable[str] = ()
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(input_shape, num_classes, num_stages)`` under ``name``.

    Parameters
    ----------
    name
        Value of the ``model`` field that selects the architecture.
    default_stages
        The paper's ``S`` for this model (ProgFed Sec. 4.1: 3 for EMNIST, 4 otherwise).
    spatial_dims
        Number of spatial axes of one sample: 2 for images ``(C, H, W)`` (the
        default), 3 for volumes ``(C, D, H, W)``. A builder that takes extra
        keyword options receives those given to :func:`build_model`.
    capabilities
        What the model supports, keys of :data:`CAPABILITIES` (none by default).

    Raises
    ------
    ValueError
        If ``name`` is already registered, ``default_stages`` < 1,
        ``spatial_dims`` is not 1, 2 or 3, or a capability is unknown (a programming error).
    """
    if not isinstance(default_stages, int) or default_stages < 1:
        raise ValueError(f"default_stages for {name!r} must be a positive int, got {default_stages!r}")
    if spatial_dims not in _SHAPE_NAMES:
        raise ValueError(f"spatial_dims for {name!r} must be 1, 2 or 3, got {spatial_dims!r}")
    declared = frozenset(capabilities)
    unknown = sorted(declared - CAPABILITIES.keys())
    if unknown:
        raise ValueError(f"model {name!r} declares unknown capabilities {unknown}; known: {sorted(CAPABILITIES)}")

    def decorator(builder: Builder) -> Builder:
        MODELS.add(name, ModelEntry(builder, default_stages, spatial_dims, declared))
        return builder

    return decorator


def available_models() -> list[str]:
    """Sorted names accepted by the ``model`` field."""
    return MODELS.names()


def models_with(capability: str) -> tuple[str, ...]:
    """Names of the models that declare ``capability``, in registration order.

    Raises
    ------
    ValueError
        ``capability`` is not a key of :data:`CAPABILITIES` (a typo would otherwise find no model).
    """
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown model capability {capability!r}; known: {sorted(CAPABILITIES)}")
    return tuple(name for name, entry in MODELS.items() if capability in entry.capabilities)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; :class:`FieldError` listing the models if unknown."""
    try:
        return MODELS[name]
    except UnknownNameError as exc:
        raise FieldError("model", str(exc)) from None


def default_stages(name: str) -> int:
    """The paper's number of stages ``S`` for model ``name`` (ProgFed Sec. 4.1, App. B)."""
    return model_entry(name).default_stages


def _check_input(
    name: str, input_shape: Sequence[int], num_classes: int, spatial_dims: int = 2
) -> tuple[int, ...]:
    """Validate ``(C, H, W)`` (or ``(C, D, H, W)`` for volumes) and the class count up front."""
    shape = tuple(input_shape)
    if len(shape) != spatial_dims + 1 or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise FieldError(
            "model", f"{name} expects an input shape {_SHAPE_NAMES[spatial_dims]} of positive "
            f"ints, got {shape!r}"
        )
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise FieldError("model", f"{name} needs num_classes >= 1, got {num_classes!r}")
    return shape


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    num_stages: int | None = None,
    **options: Any,
) -> StagedModel:
    """Build the staged model ``name`` for inputs of ``input_shape`` and ``num_classes`` outputs.

    Parameters
    ----------
    name
        A registered model name (see :func:`available_models`).
    input_shape
        Shape ``(C, H, W)`` of one sample; sizes the first layer and every head.
    num_classes
        Number of logits of every head ``G_s``.
    num_stages
        ``S``; ``None`` uses the paper's default for the model.
    **options
        Architecture options passed to the builder as keyword arguments (e.g.
        ``base_width``, ``growth``, ``bridge`` of ``unet3d``); none by default.

    Returns
    -------
    StagedModel
        The model, at its full stage, with PyTorch's default initialisation
        (call :func:`fedml_progfed.core.staged_model.initialize` for seeded weights).

    Raises
    ------
    FieldError
        Unknown name, bad input shape or class count, ``S`` outside ``1..#units``,
        or an option the model does not take.
    """
    entry = model_entry(name)
    shape = _check_input(name, input_shape, num_classes, entry.spatial_dims)
    stages = entry.default_stages if num_stages is None else num_stages
    if isinstance(stages, bool):
        raise FieldError("progfed.stages", f"must be an int, got {stages!r}")
    if options:
        try:
            inspect.signature(entry.builder).bind(shape, num_classes, stages, **options)
        except TypeError:
            raise FieldError(
            "model", f"{name} does not take the option(s) {', '.join(sorted(options))}"
            ) from None
    model = entry.builder(shape, num_classes, stages, **options)
    # Algorithms that add modules (ProFL's basic layers) and memory probes need these;
    # narrow_copy needs the whole recipe.
    model.input_shape, model.num_classes = shape, num_classes
    model.build_spec = BuildSpec(name, shape, num_classes, stages, tuple(sorted(options.items())))
    return model


def check_width_ratio(ratio: object, field: str = WIDTH_OPTION) -> float:
    """``ratio`` as a float in ``(0, 1]``, else :class:`FieldError` on ``field``.

    The builders of :data:`WIDTH` models call it on their ``width_ratio`` option.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise FieldError(field, f"must be a number in (0, 1] (the share of every hidden width), got {ratio!r}")
    return float(ratio)


def narrow_copy(model: StagedModel, ratio: float) -> StagedModel:
    """The same architecture as ``model`` with every hidden width scaled by ``ratio`` (HeteroFL Sec. 3).

    The copy is rebuilt through the registry from ``model.build_spec`` (same input shape,
    classes, stages and options), with ``width_ratio`` multiplied by ``ratio``: ratios
    compose, so the copy is narrower than (or, at ``ratio = 1``, identical in layout to)
    ``model`` even when ``model`` is itself narrow. Its state-dict keys are ``model``'s
    and every tensor's shape is a leading slice of ``model``'s (see
    :mod:`fedml_progfed.core.width`). Modules added after building (e.g. ProFL's basic
    layers) are not part of the recipe and are not copied.

    The weights are PyTorch's default initialisation, drawn under a forked RNG so the
    global random stream is left as it was; load the sliced global weights into it.

    Raises
    ------
    FieldError
        On ``model``: it was not built by :func:`build_model` or does not declare
        :data:`WIDTH` (the message lists the models that do); on ``width_ratio``:
        ``ratio`` is not in ``(0, 1]``.
    """
    spec = getattr(model, "build_spec", None)
    widths = ", ".join(models_with(WIDTH))
    if not isinstance(spec, BuildSpec):
        raise FieldError(
            "model", f"cannot narrow this {type(model).__name__}: it was not built by build_model "
            f"(no build_spec); models with width scaling: {widths}"
        )
    if WIDTH not in model_entry(spec.name).capabilities:
        raise FieldError("model", f"{spec.name} has no width scaling (HeteroFL); use one of {widths}")
    options = spec.options_dict()
    composed = check_width_ratio(ratio) * check_width_ratio(options.get(WIDTH_OPTION, 1.0))
    options[WIDTH_OPTION] = composed
    with torch.random.fork_rng(devices=[]):
        return build_model(spec.name, spec.input_shape, spec.num_classes, spec.num_stages, **options)
