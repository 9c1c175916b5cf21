"""Brain-tumour segmentation as a task: Dice(+BCE) loss and the BraTS region Dice.

ProgFed Sec. 4.3 scores the federated 3D U-Net on BraTS by Dice. Targets are the
three nested, overlapping regions of the BraTS evaluation (Menze et al., 2014;
Bakas et al., 2018) -- whole tumour, tumour core, enhancing tumour -- so the model
emits three independent sigmoid channels (multi-label), not a softmax.

Framework-free: torch and MONAI only. MONAI is imported lazily, on the first loss or
evaluation call: ``import monai`` costs several seconds, and importing this module
(which the data registry does for every run) must not slow down classification runs.

Loss choice: MONAI ``DiceLoss(sigmoid=True)`` plus ``BCEWithLogitsLoss`` (weight
``bce_weight``, default 1). Dice alone optimises the reported metric and copes with
the class imbalance, but on patches where a region is absent (frequent for ET) its
gradient is weak and erratic; the voxel-wise BCE term gives every voxel a
well-scaled gradient, which stabilises the few local steps of a federated round.
Dice + cross-entropy is the nnU-Net default for BraTS. ``bce_weight=0`` gives pure Dice.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

from fedml_progfed.tasks.base import evaluation_mode

#: Output channels, in the order of ``fedml_progfed.data.brats.REGIONS``.
REGION_NAMES: tuple[str, ...] = ("wt", "tc", "et")
#: Default sliding-window ROI: the default BraTS training patch.
DEFAULT_ROI: tuple[int, int, int] = (128, 128, 128)


class SegmentationTask:
    """Multi-label 3D segmentation scored by mean Dice over WT, TC and ET.

    A :class:`~fedml_progfed.tasks.base.Task`; :meth:`evaluate` adds the Dice of each
    region (``dice_wt``, ``dice_tc``, ``dice_et``) to ``test_loss`` and ``test_metric``.

    Parameters
    ----------
    roi_size
        Training patch size ``(D, H, W)``. Evaluation inputs of any other size
        (whole volumes, ``eval_mode="full"``) go through MONAI's
        ``sliding_window_inference`` with this ROI, so the model only ever sees
        inputs of the shape it was trained on.
    threshold
        Sigmoid probability above which a voxel is predicted in a region.
    bce_weight
        Weight of the BCE term added to the Dice loss (0: Dice only).
    overlap
        Sliding-window overlap (0.5 as in MONAI's BraTS tutorial).
    sw_batch_size
        Windows per forward pass during sliding-window inference.
    blend
        Sliding-window blending, ``"gaussian"`` (down-weights window borders) or ``"constant"``.
    """

    name = "segmentation"
    metric_name = "dice"

    def __init__(
        self,
        roi_size: Sequence[int] = DEFAULT_ROI,
        threshold: float = 0.5,
        bce_weight: float = 1.0,
        overlap: float = 0.5,
        sw_batch_size: int = 1,
        blend: str = "gaussian",
    ) -> None:
        roi = tuple(int(v) for v in roi_size)
        if len(roi) != 3 or min(roi) < 1:
            raise ValueError(f"roi_size must be three positive integers (D, H, W), got {roi_size!r}")
        self.roi_size: tuple[int, int, int] = roi  # type: ignore[assignment]
        self.threshold = float(threshold)
        self.bce_weight = float(bce_weight)
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.blend = blend
        self._dice_loss: nn.Module | None = None  # built on first use (lazy MONAI import)

    # ------------------------------------------------------------------ loss

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Dice loss on sigmoid(logits) (MONAI) + ``bce_weight`` x BCE-with-logits; a scalar.

        ``logits`` and ``target`` are ``(B, 3, D, H, W)``; target in {0, 1}.
        """
        if self._dice_loss is None:
            from monai.losses import DiceLoss

            # Per-sample, per-channel Dice averaged over both (MONAI's defaults), on sigmoid outputs.
            self._dice_loss = DiceLoss(sigmoid=True)
        target = target.to(logits.dtype)
        loss = self._dice_loss(logits, target)
        if self.bce_weight:
            loss = loss + self.bce_weight * nn.functional.binary_cross_entropy_with_logits(logits, target)
        return loss

    # ------------------------------------------------------------------ evaluation

    def example_batch(self, input_shape: tuple[int, ...], num_classes: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero volumes and empty region masks, ``(B, C, D, H, W)`` and ``(B, num_classes, D, H, W)``."""
        return torch.zeros(batch_size, *input_shape), torch.zeros(batch_size, num_classes, *input_shape[1:])

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x``: one forward pass for ROI-sized input, else sliding-window inference."""
        if tuple(x.shape[2:]) == self.roi_size:
            return model(x)
        from monai.inferers import sliding_window_inference

        out = sliding_window_inference(
            x, self.roi_size, self.sw_batch_size, model, overlap=self.overlap, mode=self.blend
        )
        return torch.as_tensor(out)  # a plain tensor, not a MONAI MetaTensor

    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device) -> dict[str, float]:
        """Loss and Dice per region over all cases of ``batches``.

        Returns
        -------
        dict
            ``test_loss`` (mean per case), ``test_metric`` (mean of the three region
            Dice scores), ``dice_wt``, ``dice_tc``, ``dice_et`` (each the mean over
            cases). NaN everywhere when ``batches`` is empty.

        Notes
        -----
        Dice uses MONAI's ``DiceMetric`` on ``sigmoid(logits) > threshold`` with
        ``ignore_empty=False``: a case without a region scores 1 if nothing is
        predicted there and 0 otherwise, the BraTS challenge convention (cases
        without ET are common and are not dropped from the mean).
        """
        from monai.metrics import DiceMetric

        metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
        loss_sum, count = 0.0, 0
        with evaluation_mode(model):
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                logits = self.predict(model, x)
                loss_sum += float(self.loss(logits, y)) * len(y)
                count += len(y)
                metric(y_pred=(torch.sigmoid(logits) > self.threshold).to(y.dtype), y=y)
        if count == 0:
            nan = float("nan")
            return {"test_loss": nan, "test_metric": nan, **{f"dice_{r}": nan for r in REGION_NAMES}}
        per_region = metric.aggregate().detach().cpu().reshape(-1).tolist()
        metric.reset()
        result: dict[str, float] = {"test_loss": loss_sum / count, "test_metric": float(sum(per_region) / len(per_region))}
        result.update({f"dice_{r}": float(v) for r, v in zip(REGION_NAMES, per_region)})
        return result

    def __repr__(self) -> str:
        return (
            f"SegmentationTask(roi_size={self.roi_size}, threshold={self.threshold}, bce_weight={self.bce_weight}, "
            f"overlap={self.overlap}, blend={self.blend!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Drop the cached MONAI module so the task pickles cheaply (rebuilt on first use).
        state = dict(self.__dict__)
        state["_dice_loss"] = None
        return state

