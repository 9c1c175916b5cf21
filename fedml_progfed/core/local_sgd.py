"""Local training on a client: SGD over a chosen parameter set, optionally with FedProx's term.

ProgFed Alg. 1 lines 19-24 (local updates of the active sub-model) and
Sec. 4.4 (FedProx, Li et al. 2020: ``loss + mu/2 ||w - w_global||^2``). Every
algorithm's ``client_update`` calls :func:`local_sgd` with its own objective,
so the loop, the optimizer and the accounting of samples and loss exist once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

#: ``objective(x, y) -> loss`` for one batch (already on the device).
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SGDSettings:
    """Hyper-parameters of local SGD (a fresh optimizer every round)."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 1
    prox_mu: float = 0.0


def local_sgd(
    params: Sequence[torch.nn.Parameter],
    batches: Iterable,
    objective: Objective,
    settings: SGDSettings,
    device: torch.device,
) -> tuple[float, int]:
    """Run ``settings.epochs`` passes of SGD on ``params``; returns (mean loss, samples processed).

    The mean loss is the objective without the proximal term, weighted by batch size.
    """
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    mu = settings.prox_mu
    anchors = [p.detach().clone() for p in params] if mu > 0 else []
    loss_sum, samples = 0.0, 0
    for _ in range(settings.epochs):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            loss = objective(x, y)
            total = loss + 0.5 * mu * sum((p - a).pow(2).sum() for p, a in zip(params, anchors)) if mu > 0 else loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            samples += len(y)
    return (loss_sum / samples if samples else math.nan), samples
