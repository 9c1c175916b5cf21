"""Clipping a client's update as one vector (DP-FedAvg, McMahan et al. 2018, Alg. 1 ``ClipFn``).

The bound holds for the concatenation of every tensor a client uploads, whatever stage
or step the round trains: clipping per tensor would let the sensitivity grow with the
number of tensors, so with every growth.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all floating-point ``tensors`` as one vector (accumulated in float64)."""
    total = 0.0
    for tensor in tensors.values():
        if tensor.is_floating_point():
            total += float(tensor.detach().double().pow(2).sum())
    return math.sqrt(total)


def clip_to_norm(tensors: Mapping[str, torch.Tensor], bound: float) -> tuple[dict[str, torch.Tensor], float]:
    """(``tensors`` scaled by ``min(1, bound / norm)``, the norm before clipping).

    Tensors with a non-finite norm come back unchanged: no scale bounds them, and the
    server's update checks drop a non-finite update (recorded with its client) before any merge.
    """
    norm = l2_norm(tensors)
    if not math.isfinite(norm):
        return dict(tensors), norm
    # float32 rounding of the scaled tensors may land a hair above the bound; the server clips again
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {name: (t * scale if t.is_floating_point() else t) for name, t in tensors.items()}, norm
