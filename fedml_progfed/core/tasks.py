"""What is learned and how it is scored: the loss clients minimise and the server's test metric.

A registry keyed by task name, so a segmentation task can sit beside
classification without if/elif chains in the trainer or aggregator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Task:
    """A loss for training and a metric (higher is better, in [0, 1]) for testing."""

    name: str
    metric_name: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    correct: Callable[[torch.Tensor, torch.Tensor], float]

    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device) -> tuple[float, float]:
        """Mean loss and metric over all samples of ``batches``."""
        was_training = model.training
        model.eval()
        loss_sum, score_sum, count = 0.0, 0.0, 0
        with torch.no_grad():
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                out = model(x)
                loss_sum += float(self.loss(out, y)) * len(y)
                score_sum += self.correct(out, y)
                count += len(y)
        model.train(was_training)
        if count == 0:
            return float("nan"), float("nan")
        return loss_sum / count, score_sum / count


def _correct_predictions(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).sum())


TASKS: dict[str, Task] = {
    "classification": Task("classification", "accuracy", F.cross_entropy, _correct_predictions),
}


# The segmentation task registers itself (MONAI is imported only when it is used).
import fedml_progfed.core.segmentation  # noqa: E402,F401
