"""Width-nested sub-models: the tensor side of HeteroFL (Diao et al., ICLR 2021, Sec. 3).

HeteroFL gives a client of capability ``r`` (its *model rate*) the sub-model whose every
hidden width is ``ceil(r * width)``, and whose every tensor is the *leading slice* of the
global one: ``W[:out', :in', ...]``. Each round the server cuts those slices out, clients
train them, and the server averages every element over the clients whose slice covers it
(Sec. 3, "Heterogeneous models"). Two training devices come with it: the *scaler*, which
divides a narrow model's activations by ``r`` during training, and *static batch norm*,
which keeps no running statistics (Sec. 3, "Static Batch Normalization", "Scaler").

This module holds those pieces, framework-free (torch only); building a narrow copy of a
registered model is :func:`fedml_progfed.models.registry.narrow_copy`, and deciding who
gets which rate is the algorithm's business.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fedml_progfed.core.staged_model import forget_layout

# ``width * ratio`` is rounded to this many decimals before ``ceil``, so that a product
# such as 100 * 0.07 = 7.000000000000001 gives 7 channels, not 8.
_ROUND_DIGITS = 9


def _check_ratio(ratio: float) -> float:
    """``ratio`` as a float in ``(0, 1]``; ValueError otherwise (NaN included)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"width ratio must be a number in (0, 1], got {ratio!r}")
    return float(ratio)


def scaled(width: int, ratio: float, multiple: int = 1) -> int:
    """Hidden width of a sub-model at ``ratio``: ``ceil(width * ratio)``, at least and rounded up to ``multiple``.

    HeteroFL (Sec. 3) shrinks every hidden width ``w`` of the global model to
    ``ceil(r * w)``; rounding up to ``multiple`` keeps widths divisible by a group
    norm's groups. When ``width`` is itself a multiple of ``multiple`` (as every
    full width is), the result never exceeds ``width``, and ``ratio = 1`` returns it.

    Parameters
    ----------
    width
        The full model's width, ``>= 1``.
    ratio
        The model rate ``r`` in ``(0, 1]``.
    multiple
        The result is a positive multiple of this, ``>= 1``.

    Returns
    -------
    int
        ``max(multiple, multiple * ceil(ceil(width * ratio) / multiple))``.

    Raises
    ------
    ValueError
        ``width`` or ``multiple`` below 1, or ``ratio`` outside ``(0, 1]``.
    """
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    ratio = _check_ratio(ratio)
    narrow = math.ceil(round(width * ratio, _ROUND_DIGITS))
    return max(multiple, -(-narrow // multiple) * multiple)


def _check_fits(name: str, shape: Sequence[int], full: Sequence[int]) -> tuple[int, ...]:
    """``shape`` as a tuple if it has ``full``'s rank and no larger dimension; ValueError otherwise."""
    shape, full = tuple(shape), tuple(full)
    if len(shape) != len(full):
        raise ValueError(f"{name}: shape {shape} has rank {len(shape)}, the full tensor {full} has rank {len(full)}")
    if any(d > f for d, f in zip(shape, full)):
        raise ValueError(f"{name}: shape {shape} is larger than the full shape {full} in some dimension")
    return shape


def _box(shape: Sequence[int]) -> tuple[slice, ...]:
    """Index of the leading slice ``[:shape[0], :shape[1], ...]``."""
    return tuple(slice(0, d) for d in shape)


def leading_slice(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The view ``tensor[:shape[0], :shape[1], ...]``: a narrow model's share of a tensor (HeteroFL Sec. 3).

    Parameters
    ----------
    tensor
        A full model's tensor.
    shape
        The narrow shape, of the same rank and no larger in any dimension.

    Returns
    -------
    torch.Tensor
        A view (no copy): writing to it writes to ``tensor``.

    Raises
    ------
    ValueError
        ``shape`` has another rank, or a dimension larger than ``tensor``'s.
    """
    shape = _check_fits("leading_slice", shape, tensor.shape)
    return tensor[_box(shape)]


def narrow_shapes(full: nn.Module, narrow: nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict name -> shape in ``narrow``, for every name of ``full`` (in ``full``'s order).

    Raises
    ------
    ValueError
        The models' state-dict names differ (the first differing name is given), or a
        narrow tensor has another rank or a dimension larger than the full one.
    """
    full_shapes = {name: tuple(t.shape) for name, t in full.state_dict().items()}
    narrow_state = narrow.state_dict()
    missing = [name for name in full_shapes if name not in narrow_state]
    extra = [name for name in narrow_state if name not in full_shapes]
    if missing or extra:
        first = (
            f"{missing[0]!r} is missing from the narrow model" if missing else f"{extra[0]!r} is not in the full model"
        )
        raise ValueError(f"the models' state-dict names differ: {first}; build both with the same stages and options")
    return {name: _check_fits(name, narrow_state[name].shape, shape) for name, shape in full_shapes.items()}


def narrow_state(state: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Detached copies of the leading slices ``state[name][:shape]`` for every name of ``shapes``.

    This is what the HeteroFL server sends a client of a narrower rate (Sec. 3); names of
    ``state`` that ``shapes`` lacks are left out.

    Raises
    ------
    ValueError
        A name of ``shapes`` is not in ``state``, or its shape does not fit (see :func:`leading_slice`).
    """
    missing = [name for name in shapes if name not in state]
    if missing:
        raise ValueError(f"narrow_state: {missing[0]!r} is not in the state ({len(missing)} name(s) missing)")
    return {
        name: state[name].detach()[_box(_check_fits(name, shape, state[name].shape))].clone()
        for name, shape in shapes.items()
    }


def _result_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The promoted floating dtype of ``tensors``; the default float dtype if none is floating."""
    floating = [t.dtype for t in tensors if t.is_floating_point()]
    if not floating:
        return torch.get_default_dtype()
    dtype = floating[0]
    for other in floating[1:]:
        dtype = torch.promote_types(dtype, other)
    return dtype


def _check_weight(weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"covered_mean: contribution weights must be finite and >= 0, got {weight!r}")
    return float(weight)


def _covered_mean_one(
    name: str, full: tuple[int, ...], pieces: Sequence[tuple[float, torch.Tensor]]
) -> torch.Tensor:
    """Weighted mean over ``pieces`` (weight, leading slice) of each element of a ``full``-shaped tensor."""
    tensors = [t for _, t in pieces]
    dtype = _result_dtype(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    cover = torch.zeros(full, dtype=dtype, device=device)
    for weight, tensor in pieces:
        cover[_box(tensor.shape)] += weight
    # Shares weight / cover rather than sum / cover: an element one client covers gets
    # share 1.0 exactly, hence exactly that client's value.
    # (A 0-dim tensor, not a float: ``float / tensor`` multiplies by a reciprocal, not exact.)
    result = torch.zeros(full, dtype=dtype, device=device)
    for weight, tensor in pieces:
        box = _box(tensor.shape)
        covered = cover[box]
        share = torch.where(covered > 0, torch.tensor(weight, dtype=dtype, device=device) / covered, 0.0)
        result[box] += share * tensor.to(device=device, dtype=dtype)
    return result


def covered_mean(
    shapes_full: Mapping[str, Sequence[int]],
    names: Sequence[str],
    contributions: Sequence[tuple[float, Mapping[str, torch.Tensor]]],
) -> dict[str, torch.Tensor]:
    """HeteroFL's aggregation of overlapping leading slices (Sec. 3, "Heterogeneous models").

    Every element of the global tensor is the weighted mean of the clients whose
    sub-model holds it; elements nobody holds are left to the caller. Used on updates
    (deltas), the result is 0 where nobody covered an element, so adding it leaves that
    element of the global model unchanged.

    Parameters
    ----------
    shapes_full
        Full shape of every name.
    names
        The names to aggregate, each a key of ``shapes_full``; the result has exactly these.
    contributions
        ``(weight, tensors)`` per client: ``tensors[name]`` is a leading slice of any shape
        that fits in the full one, or absent when the client does not hold ``name``;
        names outside ``names`` are ignored. Weights are finite and ``>= 0`` (e.g. 1 for
        HeteroFL's plain mean, or the client's sample count).

    Returns
    -------
    dict of str to torch.Tensor
        Per name, a full-shaped floating tensor (the promoted dtype of the contributions,
        on the first contribution's device): at each element, ``sum_i w_i x_i / sum_i w_i``
        over the contributions ``i`` covering it; exactly 0 where none (or only
        weight-0 ones) did. A name nobody holds is all zeros.

    Raises
    ------
    ValueError
        A name is not in ``shapes_full``, a weight is negative or not finite, or a
        contribution's tensor does not fit in its full shape.
    """
    unknown = [name for name in names if name not in shapes_full]
    if unknown:
        raise ValueError(f"covered_mean: {unknown[0]!r} has no full shape ({len(unknown)} name(s) unknown)")
    weighted = [(_check_weight(weight), tensors) for weight, tensors in contributions]
    result: dict[str, torch.Tensor] = {}
    for name in names:
        full = tuple(shapes_full[name])
        pieces = [(w, t[name]) for w, t in weighted if name in t]
        for _, tensor in pieces:
            _check_fits(name, tensor.shape, full)
        result[name] = _covered_mean_one(name, full, pieces)
    return result


def _scale_output(ratio: float):
    """A forward hook dividing the output by ``ratio`` in training mode only."""

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output / ratio if module.training else output

    return hook


def _skipped(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def add_scaler(model: nn.Module, ratio: float, skip: Iterable[str] = ()) -> list[RemovableHandle]:
    """HeteroFL's scaler (Sec. 3, "Scaler"): divide every Conv / Linear output by ``ratio`` while training.

    A sub-model at rate ``r`` sums over only a fraction ``r`` of each layer's input
    channels, so its pre-activations are about ``r`` times the full model's. HeteroFL
    rescales them by ``1 / r`` during local training, as inverted dropout does, so the
    narrow model trains on activations of the full model's magnitude; in evaluation the
    layers run unscaled.

    Parameters
    ----------
    model
        The narrow model; hooks go on every ``Conv{1,2,3}d``, ``ConvTranspose*d`` and
        ``Linear`` module.
    ratio
        The model rate ``r`` in ``(0, 1]``.
    skip
        Module names (prefixes) left unscaled, e.g. ``("heads",)`` for a staged model's
        classifier heads: HeteroFL puts no scaler on the output layer.

    Returns
    -------
    list of RemovableHandle
        The hooks' handles, in module order; ``handle.remove()`` undoes one.

    Raises
    ------
    ValueError
        ``ratio`` outside ``(0, 1]``.
    """
    hook = _scale_output(_check_ratio(ratio))
    prefixes = tuple(skip)
    return [
        module.register_forward_hook(hook)
        for name, module in model.named_modules()
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and not _skipped(name, prefixes)
    ]


def static_batch_norm(model: nn.Module) -> int:
    """HeteroFL's static batch norm (Sec. 3, "Static Batch Normalization"): no running statistics.

    Running statistics of a layer trained on clients of different widths and data
    cannot be averaged meaningfully, so HeteroFL tracks none: every BatchNorm layer
    then normalises with the statistics of the batch it sees, in training *and* in
    evaluation. The affine weight and bias stay (and nest like any tensor).

    Each layer gets ``track_running_stats = False`` and its ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` buffers set to ``None``, so **those keys
    leave the state dict**: apply this identically to the server's and the clients'
    models. The model's cached layout (:func:`~fedml_progfed.core.staged_model.state_shapes`)
    is dropped. GroupNorm, InstanceNorm and LayerNorm are left alone.

    Returns
    -------
    int
        The number of layers changed (already-static layers are not counted again).
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.track_running_stats or module.running_mean is not None
        ):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
            changed += 1
    if changed:
        forget_layout(model)
    return changed
