"""Record-level DP-SGD inside a client (Abadi et al., CCS 2016) with Opacus.

Opacus gives what hand-written code gets wrong: per-sample gradients (its
``GradSampleModule`` hooks, on the trainable modules only, so a frozen prefix or a
teacher costs nothing), their clipping and Gaussian noise (``DPOptimizer``) and
Poisson-sampled batches (``DPDataLoader``, the sampling its accountant assumes). A
fresh private optimizer is built every round around the sub-model the round trains,
so growth, head replacement and step changes need nothing special.

The per-sample bound holds for the trainable parameters as one vector; the noise's
draws and the Poisson sampling come from a seed the client keeps to itself.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedml_progfed.core.local_sgd import SGDSettings


@dataclass(frozen=True)
class PrivateSGDSettings:
    """DP-SGD's per-sample clip ``C`` and noise multiplier ``z`` (noise std ``z C`` on each batch's sum)."""

    clip: float
    noise_multiplier: float


@dataclass(frozen=True)
class PrivateSteps:
    """What a client's DP-SGD did in one round: what its accountant is charged with."""

    population: int  # records the Poisson sampling drew from
    steps: int  # noised optimizer steps
    sample_rate: float  # each record's probability of being in a batch


def planned_steps(records: int, batch_size: int, epochs: int) -> PrivateSteps:
    """What :func:`private_local_sgd` will do on ``records``: Opacus' loader takes ceil(N / B) batches a pass."""
    batches = -(-records // batch_size)
    return PrivateSteps(records, epochs * batches, 1 / batches)


def private_local_sgd(
    module: nn.Module,
    params: Sequence[torch.nn.Parameter],
    batches: Any,
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    settings: SGDSettings,
    private: PrivateSGDSettings,
    device: torch.device,
    seed: int,
) -> tuple[float, int, PrivateSteps]:
    """``settings.epochs`` passes of DP-SGD on ``params`` of ``module``; (loss, samples, steps taken).

    ``batches`` must expose its records as ``batches.dataset`` and its size as
    ``batches.batch_size`` (every in-memory loader of this package does). An empty Poisson
    batch still takes a noised step: skipping it would tell the server the batch was empty.
    What leaves the client besides the noised model is public: the loss is NaN (a statistic of
    the records, not noised) and the samples are ``epochs x records``, not the Poisson batches' sum.
    """
    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

    dataset = getattr(batches, "dataset", None)
    if dataset is None or not hasattr(batches, "batch_size"):
        raise ValueError("record-level DP-SGD needs a loader with .dataset and .batch_size (an in-memory client data set)")
    sampling = torch.Generator().manual_seed(seed)
    loader = DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=batches.batch_size), generator=sampling)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure_mode on every construction
        wrapped = GradSampleModule(module, loss_reduction="mean")
        optimizer = DPOptimizer(
            torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay),
            noise_multiplier=private.noise_multiplier, max_grad_norm=private.clip,
            # Opacus' own choice in make_private: records x the loader's rate, N / ceil(N / B)
            expected_batch_size=max(1, int(len(dataset) * loader.sample_rate)), loss_reduction="mean",
            generator=torch.Generator(device=device).manual_seed(seed + 1),
        )
    steps = 0
    augment = getattr(batches, "augment", None)
    try:
        for _ in range(settings.epochs):
            for x, y in loader:
                optimizer.zero_grad(set_to_none=True)
                if len(y):
                    x, y = x.to(device), y.to(device)
                    if augment is not None:
                        x = augment(x)
                    objective(x, y).backward()
                else:
                    for p in params:  # noise alone, as for any other batch
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                optimizer.step()
                steps += 1
    finally:
        optimizer.zero_grad(set_to_none=True)
        wrapped._close()  # hooks and per-sample gradients off the model: the next round starts clean
    records = len(dataset)
    return math.nan, settings.epochs * records, PrivateSteps(records, steps, float(loader.sample_rate))
