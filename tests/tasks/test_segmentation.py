"""SegmentationTask: MONAI Dice(+BCE) loss, region Dice, sliding-window evaluation, the Task protocol."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fedml_progfed.tasks import REQUIRED_SCORES, SegmentationTask, Task

ROI = (8, 8, 8)
ROOT = Path(__file__).resolve().parents[2]


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


def test_is_a_task() -> None:
    task = SegmentationTask(roi_size=(16, 16, 8))
    assert isinstance(task, Task)
    assert (task.name, task.metric_name, task.roi_size) == ("segmentation", "dice", (16, 16, 8))


def test_perfect_prediction_dice_one() -> None:
    task = SegmentationTask(roi_size=ROI)
    result = task.evaluate(Oracle(), [_batch(_target()), _batch(_target(et=False))], torch.device("cpu"))
    assert set(result) == {*REQUIRED_SCORES, "dice_wt", "dice_tc", "dice_et"}
    assert all(type(v) is float for v in result.values())
    for key in ("test_metric", "dice_wt", "dice_tc", "dice_et"):
        assert result[key] == pytest.approx(1.0)  # no-ET case predicted empty scores 1 (BraTS convention)
    # Soft Dice of a confidently empty channel with an empty target is not exactly 0 (MONAI smoothing).
    assert result["test_loss"] < 0.05
    assert task.evaluate(Oracle(), [_batch(_target())], torch.device("cpu"))["test_metric"] == pytest.approx(1.0)


def test_empty_vs_full_dice_zero() -> None:
    task = SegmentationTask(roi_size=ROI)
    full = torch.ones(1, 3, *ROI)
    x = torch.zeros(1, 4, *ROI)  # Oracle predicts nothing
    result = task.evaluate(Oracle(), [(x, full)], torch.device("cpu"))
    assert result["test_metric"] == pytest.approx(0.0, abs=1e-6)
    assert result["test_loss"] > 1.0  # Dice ~1 plus a large BCE
    # Full prediction against an empty target is also 0.
    result = task.evaluate(Oracle(), [(torch.ones(1, 4, *ROI), torch.zeros(1, 3, *ROI))], torch.device("cpu"))
    assert result["test_metric"] == pytest.approx(0.0, abs=1e-6)


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
    result = task.evaluate(Oracle(), [_batch(big)], torch.device("cpu"))
    assert result["test_metric"] == pytest.approx(1.0)

    torch.manual_seed(0)
    model = nn.Conv3d(4, 3, 1)
    model.train()
    x, y = torch.randn(1, 4, 20, 12, 9), big
    assert tuple(task.predict(model.eval(), x).shape) == (1, 3, 20, 12, 9)
    model.train()
    result = task.evaluate(model, [(x, y)], torch.device("cpu"))
    assert math.isfinite(result["test_loss"]) and 0.0 <= result["test_metric"] <= 1.0
    assert model.training  # train/eval mode restored
    model.eval()
    task.evaluate(model, [(x, y)], torch.device("cpu"))
    assert not model.training  # an eval-mode model stays in eval mode


def test_empty_batches_give_nan() -> None:
    result = SegmentationTask(roi_size=ROI).evaluate(Oracle(), [], torch.device("cpu"))
    assert set(result) == {*REQUIRED_SCORES, "dice_wt", "dice_tc", "dice_et"}
    assert all(math.isnan(v) for v in result.values())


def test_bad_roi() -> None:
    with pytest.raises(ValueError, match="roi_size"):
        SegmentationTask(roi_size=(8, 8))


def test_import_does_not_load_monai() -> None:
    # The data registry imports every task at start-up; MONAI must wait for the first loss or evaluation.
    code = "import sys, fedml_progfed.tasks, fedml_progfed.data; print(any(m.split('.')[0] == 'monai' for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
