"""SegmentationTask: MONAI Dice(+BCE) loss, region Dice, sliding-window evaluation, registration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedml_progfed.core.segmentation import SegmentationTask, segmentation_task
from fedml_progfed.core.tasks import TASKS

ROI = (8, 8, 8)


class Oracle(nn.Module):
    """Returns the target hidden in channels 0-2 of the input as confident logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3] * 40.0 - 20.0


def _target(size: tuple[int, int, int] = ROI, et: bool = True) -> torch.Tensor:
    y = torch.zeros(1, 3, *size)
    y[:, 0, 1:6, 1:6, 1:6] = 1  # WT
    y[:, 1, 2:5, 2:5, 2:5] = 1  # TC inside WT
    if et:
        y[:, 2, 3:4, 3:5, 3:5] = 1  # ET inside TC
    return y


def _batch(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([y, torch.zeros(1, 1, *y.shape[2:])], dim=1), y


def test_registered_and_classification_unchanged() -> None:
    assert isinstance(TASKS["segmentation"], SegmentationTask)
    assert TASKS["segmentation"].metric_name == "dice" and TASKS["segmentation"].name == "segmentation"
    assert TASKS["classification"].metric_name == "accuracy"
    assert segmentation_task((16, 16, 8)).roi_size == (16, 16, 8)


def test_perfect_prediction_dice_one() -> None:
    task = SegmentationTask(roi_size=ROI)
    result = task.evaluate_detailed(Oracle(), [_batch(_target()), _batch(_target(et=False))], torch.device("cpu"))
    assert set(result) == {"test_loss", "test_metric", "dice_wt", "dice_tc", "dice_et"}
    for key in ("test_metric", "dice_wt", "dice_tc", "dice_et"):
        assert result[key] == pytest.approx(1.0)  # no-ET case predicted empty scores 1 (BraTS convention)
    # Soft Dice of a confidently empty channel with an empty target is not exactly 0 (MONAI smoothing).
    assert result["test_loss"] < 0.05
    assert task.evaluate(Oracle(), [_batch(_target())], torch.device("cpu"))[1] == pytest.approx(1.0)


def test_empty_vs_full_dice_zero() -> None:
    task = SegmentationTask(roi_size=ROI)
    full = torch.ones(1, 3, *ROI)
    x = torch.zeros(1, 4, *ROI)  # Oracle predicts nothing
    loss, dice = task.evaluate(Oracle(), [(x, full)], torch.device("cpu"))
    assert dice == pytest.approx(0.0, abs=1e-6)
    assert loss > 1.0  # Dice ~1 plus a large BCE
    # Full prediction against an empty target is also 0.
    _, dice = task.evaluate(Oracle(), [(torch.ones(1, 4, *ROI), torch.zeros(1, 3, *ROI))], torch.device("cpu"))
    assert dice == pytest.approx(0.0, abs=1e-6)


def test_loss_is_differentiable_and_bce_optional() -> None:
    y = _target()
    logits = torch.zeros(2, 3, *ROI, requires_grad=True)
    task = SegmentationTask(roi_size=ROI)
    loss = task.loss(logits, y.expand(2, -1, -1, -1, -1))
    loss.backward()
    assert loss.ndim == 0 and logits.grad is not None and logits.grad.abs().sum() > 0
    dice_only = SegmentationTask(roi_size=ROI, bce_weight=0.0).loss(logits.detach(), y.expand(2, -1, -1, -1, -1))
    assert float(loss.detach()) == pytest.approx(float(dice_only) + math.log(2.0), rel=1e-4)  # BCE of logit 0 is ln 2


def test_sliding_window_on_volume_larger_than_roi() -> None:
    task = SegmentationTask(roi_size=ROI, overlap=0.25)
    # Exact through the sliding window: blending identical values gives the same value.
    big = _target((20, 12, 9))
    result = task.evaluate_detailed(Oracle(), [_batch(big)], torch.device("cpu"))
    assert result["test_metric"] == pytest.approx(1.0)

    torch.manual_seed(0)
    model = nn.Conv3d(4, 3, 1)
    model.train()
    x, y = torch.randn(1, 4, 20, 12, 9), big
    assert tuple(task.predict(model.eval(), x).shape) == (1, 3, 20, 12, 9)
    model.train()
    loss, dice = task.evaluate(model, [(x, y)], torch.device("cpu"))
    assert math.isfinite(loss) and 0.0 <= dice <= 1.0
    assert model.training  # train/eval mode restored


def test_empty_batches_give_nan() -> None:
    result = SegmentationTask(roi_size=ROI).evaluate_detailed(Oracle(), [], torch.device("cpu"))
    assert all(math.isnan(v) for v in result.values())


def test_bad_roi() -> None:
    with pytest.raises(ValueError, match="roi_size"):
        SegmentationTask(roi_size=(8, 8))
