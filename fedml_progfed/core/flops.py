"""FLOPs measured with ``torch.utils.flop_counter`` (not hand-counted).

ProgFed reports computation as training FLOPs (Sec. 4.2, Table 2). We count one
forward and backward pass of a small batch through the sub-model exactly as it
is trained in a round (frozen parameters frozen), so warm-up rounds and frozen
prefixes are cheaper exactly as much as autograd makes them.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(model: nn.Module, prepare: Callable[[nn.Module], None], sample: torch.Tensor) -> int:
    """FLOPs of one forward pass of a CPU copy of ``model`` after ``prepare(copy)``, on ``sample``."""
    probe = copy.deepcopy(model).to("cpu").eval()
    prepare(probe)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(sample.to("cpu"))
    return int(counter.get_total_flops())


def train_flops(
    model: nn.Module,
    prepare: Callable[[nn.Module], None],
    objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    sample: torch.Tensor,
    target: torch.Tensor,
) -> int:
    """FLOPs of one forward + backward of ``objective(copy, sample, target)`` on a CPU copy of ``model``.

    ``prepare(copy)`` sets the copy up as a round trains it (stage, trainable set).
    """
    probe = copy.deepcopy(model).to("cpu")
    prepare(probe)
    with FlopCounterMode(display=False) as counter:
        objective(probe, sample.to("cpu"), target.to("cpu")).backward()
    return int(counter.get_total_flops())
