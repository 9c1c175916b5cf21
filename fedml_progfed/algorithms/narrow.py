"""Width-scaled sub-models as HeteroFL and AllSmall use them: one narrow copy per ratio, its layout, its test view.

A client of width ratio ``r`` trains a copy of the model built with every hidden width
scaled by ``r`` (:func:`~fedml_progfed.models.registry.narrow_copy`), whose tensors are the
leading slices of the global ones (HeteroFL Sec. 3). Both sides build the copy the same
way, once per ratio: with static batch norm (no running statistics, as the global model)
and, if asked, the scaler on every hidden layer (not the classifier heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from fedml_progfed.algorithms.base import Layout, RoundPlan, StageView
from fedml_progfed.core.staged_model import StagedModel, load_state, names_under, parameter_names, state_shapes
from fedml_progfed.core.width import add_scaler, narrow_shapes, narrow_state, static_batch_norm
from fedml_progfed.errors import FieldError
from fedml_progfed.models.registry import WIDTH, model_entry, models_with, narrow_copy


@dataclass
class WidthState:
    """The width a run trained (AllSmall's choice), so the handed-over model and a resumed run know it."""

    width: float = 1.0

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"width": self.width}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.width = float(meta["width"])


def check_width_model(model: StagedModel, method: str) -> None:
    """One clear error for a model that cannot be sliced by width."""
    spec = getattr(model, "build_spec", None)
    if spec is None or WIDTH not in model_entry(spec.name).capabilities:
        name = spec.name if spec is not None else type(model).__name__
        raise FieldError("model", f"{method} needs a model whose widths scale; {name} has no width scaling; "
                                  f"use one of {', '.join(models_with(WIDTH))}")


def width_of(plan: RoundPlan) -> float:
    return float(plan.details.get("width", 1.0))


def scaler_applies(model: nn.Module, setting: str) -> bool:
    """Whether HeteroFL's scaler goes on the narrow copies: ``on``, ``off``, or ``auto`` (the model normalises).

    The paper's models put a normalisation layer after every convolution, which undoes the
    scaler's 1/r in the forward pass; without one the 1/r multiplies the first layer's
    outputs and gradients (measured on the ConvNet at r = 1/8: logits 10x and conv1's
    gradient 55x the full model's) and local SGD diverges.
    """
    if setting != "auto":
        return setting == "on"
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return any(isinstance(module, norms) for module in model.modules())


def narrow_model(model: StagedModel, ratio: float, scaler: bool, purpose: str = "train") -> StagedModel:
    """The copy of ``model`` at ``ratio`` (``model`` itself at 1), built once per ratio and purpose.

    ``purpose`` keeps the clients' copy (``train``) apart from the server's test copy
    (``test``): in the standalone simulator both live in one process.
    """
    if ratio == 1.0:
        return model
    cache = model.__dict__.setdefault("_progfed_narrow", {})
    key = (ratio, scaler, purpose)
    if key not in cache:
        copy = narrow_copy(model, ratio)
        static_batch_norm(copy)
        if scaler:
            add_scaler(copy, ratio, skip=("heads",))
        cache[key] = copy
    return cache[key]


def width_layout(model: StagedModel, plan: RoundPlan, narrow: StagedModel) -> Layout:
    """The full-depth sub-model at the plan's width: every tensor sent, trained and uploaded as its slice."""
    modules = tuple(model.stage_modules(model.num_stages))
    active = tuple(names_under(model, modules))
    params = parameter_names(model)
    full = state_shapes(model)
    shapes = narrow_shapes(model, narrow) if narrow is not model else {}
    return Layout(
        label=f"width {width_of(plan):g}", modules=modules, active=active,
        trainable=tuple(n for n in active if n in params), upload=active,
        narrow={n: s for n, s in shapes.items() if n in active and s != full[n]},
    )


def width_view(model: StagedModel, ratio: float, layout: Layout) -> nn.Module:
    """The global model's slices at ``ratio`` as a full-depth model of their own, for the server's test."""
    if ratio == 1.0:
        return StageView(model, model.num_stages)
    copy = narrow_model(model, ratio, scaler=False, purpose="test")  # the scaler is identity in eval anyway
    state = model.state_dict()
    names = list(layout.active)
    shapes = {n: layout.narrow.get(n, tuple(state[n].shape)) for n in names}
    copy.to(next(model.parameters()).device)
    load_state(copy, narrow_state(state, shapes), names, what="width view")
    copy.stage = copy.num_stages
    return copy
