"""FLOPs measured with ``torch.utils.flop_counter`` (not hand-counted).

ProgFed reports computation as training FLOPs (Sec. 4.2, Table 2). We count one
forward and backward pass of a small batch through the sub-model exactly as it
is trained in a round (frozen parameters frozen), so warm-up rounds and frozen
prefixes are cheaper exactly as much as autograd makes them.

``device="meta"`` counts on meta tensors: the same operators with the same shapes are
dispatched (so the counts are identical) but nothing is computed, which makes counting
a full-size 3D U-Net a matter of milliseconds instead of minutes (``describe``).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(
    model: nn.Module, prepare: Callable[[nn.Module], None], sample: torch.Tensor, device: str = "cpu"
) -> int:
    """FLOPs of one forward pass of a copy of ``model`` on ``device`` after ``prepare(copy)``, on ``sample``."""
    probe = copy.deepcopy(model).to(device).eval()
    prepare(probe)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(sample.to(device))
    return int(counter.get_total_flops())


def train_flops(
    model: nn.Module,
    prepare: Callable[[nn.Module], None],
    objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    sample: torch.Tensor,
    target: torch.Tensor,
    device: str = "cpu",
) -> int:
    """FLOPs of one forward + backward of ``objective(copy, sample, target)`` on a copy of ``model`` on ``device``.

    ``prepare(copy)`` sets the copy up as a round trains it (stage, trainable set).
    """
    probe = copy.deepcopy(model).to(device)
    prepare(probe)
    with FlopCounterMode(display=False) as counter:
        objective(probe, sample.to(device), target.to(device)).backward()
    return int(counter.get_total_flops())
