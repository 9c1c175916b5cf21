"""ClassificationTask: cross-entropy loss, accuracy, sample weighting and the Task protocol."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedml_progfed.tasks import REQUIRED_SCORES, ClassificationTask, Task

CPU = torch.device("cpu")


class FixedLogits(nn.Module):
    """Returns the input as logits, so a test chooses the predictions exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_is_a_task_with_cross_entropy_loss() -> None:
    task = ClassificationTask()
    assert isinstance(task, Task)
    assert (task.name, task.metric_name) == ("classification", "accuracy")
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    loss = task.loss(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_accuracy_and_loss_are_per_sample_over_uneven_batches() -> None:
    # Batch 1: 3 samples, 2 right; batch 2: 1 sample, wrong. Per sample: 2/4 right, not (2/3 + 0) / 2.
    x1 = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    y1 = torch.tensor([0, 1, 1])
    x2 = torch.tensor([[0.0, 5.0]])
    y2 = torch.tensor([0])
    result = ClassificationTask().evaluate(FixedLogits(), [(x1, y1), (x2, y2)], CPU)
    assert set(result) == set(REQUIRED_SCORES)
    assert result["test_metric"] == pytest.approx(0.5)
    expected_loss = float(F.cross_entropy(torch.cat([x1, x2]), torch.cat([y1, y2]), reduction="sum")) / 4
    assert result["test_loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert all(type(v) is float for v in result.values())


def test_mode_restored_and_no_gradients() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    seen = []
    model.register_forward_hook(lambda module, inputs, output: seen.append((module.training, output.requires_grad)))
    batches = [(torch.randn(5, 3), torch.randint(0, 2, (5,)))]
    model.train()
    ClassificationTask().evaluate(model, batches, CPU)
    assert seen == [(False, False)]  # scored in eval mode, without autograd
    assert model.training
    model.eval()
    ClassificationTask().evaluate(model, batches, CPU)
    assert not model.training


def test_mode_restored_when_the_model_fails() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        ClassificationTask().evaluate(model, [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))], CPU)
    assert model.training


def test_no_samples_give_nan() -> None:
    result = ClassificationTask().evaluate(FixedLogits(), [], CPU)
    assert set(result) == set(REQUIRED_SCORES) and all(math.isnan(v) for v in result.values())
