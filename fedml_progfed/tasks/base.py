"""What every task offers: the loss clients minimise and the server's scores.

A task is chosen by the data set (see :mod:`fedml_progfed.data.registry`), never by
name from a config, so there is no registry here: a :class:`Task` is any object
with these members. :func:`evaluation_mode` is the one place that switches a
model to ``eval()`` for scoring and puts its previous mode back.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn

#: Keys every :meth:`Task.evaluate` result holds.
REQUIRED_SCORES: tuple[str, ...] = ("test_loss", "test_metric")


@runtime_checkable
class Task(Protocol):
    """A loss for training and a scored evaluation for testing.

    Attributes
    ----------
    name : str
        What is learned, e.g. ``"classification"``; shown in logs and summaries.
    metric_name : str
        What ``test_metric`` measures (higher is better, in [0, 1]), e.g. ``"accuracy"``.
    """

    name: str
    metric_name: str

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A differentiable scalar for one batch."""
        ...

    def example_batch(self, input_shape: tuple[int, ...], num_classes: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A zero batch of the task's shapes (for measuring a training step's memory and FLOPs)."""
        ...

    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device) -> dict[str, float]:
        """Scores of ``model`` over every ``(x, y)`` batch of ``batches``.

        Returns at least ``test_loss`` (mean per sample) and ``test_metric``; a task
        may add its own scores (segmentation: ``dice_wt``, ``dice_tc``, ``dice_et``).
        Every value is NaN when ``batches`` is empty. The model's train/eval mode is
        the same afterwards as before.
        """
        ...


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` and no autograd inside; the previous train/eval mode is restored on exit, even on error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
