"""FLOPs measured with ``torch.utils.flop_counter`` (not hand-counted).

ProgFed reports computation as training FLOPs (Sec. 4.2, Table 2). We count one
forward and backward pass of a one-sample batch through the sub-model that is
actually trained, with the round's frozen parameters frozen, so warm-up rounds
are cheaper than ordinary ones exactly as much as autograd makes them.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedml_progfed.core.staged_model import StagedModel, set_trainable


def forward_flops(model: StagedModel, stage: int, sample: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``M^stage`` on ``sample`` (a batch; divide by its size yourself)."""
    probe = copy.deepcopy(model).to("cpu").eval()
    probe.stage = stage
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(sample.to("cpu"))
    return int(counter.get_total_flops())


def train_flops(
    model: StagedModel,
    stage: int,
    warmup: bool,
    sample: torch.Tensor,
    target: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> int:
    """FLOPs of one forward + backward pass of ``M^stage`` on a batch, with the round's parameters frozen."""
    probe = copy.deepcopy(model).to("cpu")
    probe.stage = stage
    set_trainable(probe, stage, warmup)
    with FlopCounterMode(display=False) as counter:
        loss_fn(probe(sample.to("cpu")), target.to("cpu")).backward()
    return int(counter.get_total_flops())
