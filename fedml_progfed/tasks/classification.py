"""Image classification: cross-entropy for training, accuracy for testing."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fedml_progfed.tasks.base import evaluation_mode


class ClassificationTask:
    """Single-label classification over ``num_classes`` logits.

    ``loss`` is the mean cross-entropy of a batch; ``evaluate`` returns the mean
    cross-entropy per sample (``test_loss``) and the share of samples whose arg-max
    logit is the label (``test_metric``, accuracy).
    """

    name = "classification"
    metric_name = "accuracy"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of logits ``(B, K)`` against integer labels ``(B,)``."""
        return F.cross_entropy(output, target)

    def example_batch(self, input_shape: tuple[int, ...], num_classes: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero images and class-0 labels."""
        return torch.zeros(batch_size, *input_shape), torch.zeros(batch_size, dtype=torch.long)

    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device) -> dict[str, float]:
        """``test_loss`` (mean cross-entropy per sample) and ``test_metric`` (accuracy); NaN for no samples."""
        loss_sum, correct, count = 0.0, 0, 0
        with evaluation_mode(model):
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                logits = model(x)
                # Weighted by batch size: a partial last batch must not weigh as much as a full one.
                loss_sum += float(self.loss(logits, y)) * len(y)
                correct += int((logits.argmax(dim=1) == y).sum())
                count += len(y)
        if count == 0:
            return {"test_loss": float("nan"), "test_metric": float("nan")}
        return {"test_loss": loss_sum / count, "test_metric": correct / count}

    def __repr__(self) -> str:
        return "ClassificationTask()"
